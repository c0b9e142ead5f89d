"""Benchmark ssae's TopK training against the field's libraries: ssae (its real Trainer.train_step, sparse and
dense decoder), SAELens 6.54.12 (default and use_sparse_activations), sparsify 1.3.3 (no Triton) and
dictionary_learning 0.1.0 train TopK SAEs on the same rows in the same order with the same settings (d_sae,
k, batch, Adam learning rate held constant, steps), one thread each.  Each trainer is a persistent worker
process (peers_worker.py; the peers run in the peers venv) and they take turns, `--round` steps at a time,
so drifting machine load hits all alike.  Printed: tokens per CPU-second of each worker's training steps
(its own process time) and the ratio to ssae, and the FVU on the same held-out rows, computed here by one
function from the weights each worker hands back.

    make -C shell bench-peers          (or: python tests/bench/bench_peers.py [--store PATH] [--steps N] ...)

Rows: --store (an ssae activation store), else SmolLM2 blocks.6 activations of the shared general pool
(harvested once into $SSAE_WORKDIR and reused), else synthetic rows (said so).  Everything else is each
library's default: input scaling (ssae normalises, the others do not), decoder-bias start, SAELens's
gradient clipping and decoder-norm rescaling.  AuxK is off in ssae and sparsify (their defaults); SAELens
counts a latent dead after 1000 steps unfired and dictionary_learning after 10M tokens, so theirs does not
start within the default 50 steps.  The peers venv is $SSAE_PEERS_PYTHON or <repo>/.peers-venv (make -C shell peers);
a peer that is missing or fails to start is skipped with one line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, shared  # noqa: E402

PEERS = os.environ.get("SSAE_PEERS_PYTHON") or os.path.join(ROOT, ".peers-venv", "bin", "python")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers_worker.py")
# (label, worker name, runs in the peers venv)
TRAINERS = [("ssae", "ssae", False), ("ssae (dense decoder)", "ssae-dense", False),
            ("SAELens 6.54.12", "saelens", True), ("SAELens, use_sparse_activations*", "saelens-sparse", True),
            ("sparsify 1.3.3 (no Triton)", "sparsify", True), ("dictionary_learning 0.1.0", "dictionary_learning", True)]


def load_rows(args) -> tuple[np.ndarray, str]:
    """float32 rows [n, d_in] and where they came from."""
    from ssae_common.data.activations import ActivationStore

    path = args.store
    if path is None and (pool := shared("general", "pool.jsonl.gz")):
        from ssae_common.data.config import HarvestConfig
        from ssae_common.data.stage import harvest

        os.environ.setdefault("SSAE_WORKDIR", os.path.join(ROOT, "ssae-work"))
        print(f"harvesting {args.harvest_tokens} tokens of {pool} (SmolLM2 blocks.6; reused when already there)",
              file=sys.stderr)
        path = harvest(HarvestConfig(model="smollm2", hook="blocks.6.hook_resid_post",
                                     max_tokens=args.harvest_tokens), [pool])["path"]
    if path is None:
        g = np.random.default_rng(0)
        dirs = g.standard_normal((4096, 576)).astype(np.float32) / np.sqrt(576)
        codes = (g.random((args.harvest_tokens, 4096), dtype=np.float32) < 0.008) * g.exponential(
            1.0, (args.harvest_tokens, 4096)).astype(np.float32)
        return codes @ dirs + 0.1, "synthetic rows (no ../shared data: not SmolLM2 activations)"
    with ActivationStore(path) as store:
        return store.rows(0, store.n_tokens).astype(np.float32), f"{path} ({store.model} {store.hook})"


@torch.no_grad()
def fvu(w: dict, x: torch.Tensor, k: int, chunk: int = 2048) -> float:
    """The one evaluator: x_hat = topk(relu((x * scale - b_dec) @ W_enc + b_enc)) @ W_dec / scale + b_dec / scale."""
    t = {name: torch.from_numpy(np.asarray(v)) for name, v in w.items()}
    scale = float(t["scale"])
    sse = 0.0
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        pre = torch.relu((xs * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        values, index = pre.topk(k, dim=-1)
        x_hat = (torch.zeros_like(pre).scatter(-1, index, values) @ t["W_dec"] + t["b_dec"]) / scale
        sse += float((xs - x_hat).double().pow(2).sum())
    return sse / float((x - x.mean(0)).double().pow(2).sum())


class Worker:
    def __init__(self, label: str, name: str, python: str, setup: str, log: str, env: dict):
        self.label, self.cpu, self.steps, self.error = label, 0.0, 0, None
        self.log = log
        self.proc = subprocess.Popen([python, WORKER, name, setup], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env)

    def ask(self, cmd: dict) -> dict | None:
        """The worker's answer, or None (and self.error) when it failed."""
        if self.error is not None:
            return None
        try:
            if cmd:
                self.proc.stdin.write(json.dumps(cmd) + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        answer = json.loads(line) if line.strip() else {"error": self._last_log_line()}
        if "error" in answer:
            self.error = answer["error"]
            self.proc.kill()
            return None
        return answer

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def _last_log_line(self) -> str:
        self.proc.wait(timeout=60)
        errors = [ln for ln in open(self.log).read().splitlines() if re.match(r"\w+(Error|Exception)\b", ln)]
        return f"exited {self.proc.returncode}: {errors[-1][:200] if errors else 'no message, see ' + self.log}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="an ssae activation store (default: harvest SmolLM2 blocks.6 of the shared pool)")
    ap.add_argument("--harvest-tokens", type=int, default=100_000, help="rows to harvest without --store")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--round", type=int, default=5, help="steps each trainer runs per turn")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, help="default 2e-4 / sqrt(d_sae / 2^14), as ssae, sparsify and "
                                            "dictionary_learning derive it")
    ap.add_argument("--val-rows", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma-separated worker names (" + ", ".join(t[1] for t in TRAINERS) + ")")
    args = ap.parse_args()
    lr = args.lr or 2e-4 / math.sqrt(args.d_sae / 2**14)
    started, load = time.monotonic(), os.getloadavg()[0]

    rows, source = load_rows(args)
    g = np.random.default_rng(args.seed)
    perm = g.permutation(len(rows))
    val, train = torch.from_numpy(rows[perm[:args.val_rows]]), rows[perm[args.val_rows:]]
    need = args.steps * args.batch
    order = np.concatenate([g.permutation(len(train)) for _ in range(math.ceil(need / len(train)))])[:need]
    tmp = tempfile.mkdtemp(prefix="ssae-bench-peers-")
    np.save(os.path.join(tmp, "rows.npy"), train)
    np.save(os.path.join(tmp, "order.npy"), order)
    del rows, train
    setup = os.path.join(tmp, "setup.json")
    with open(setup, "w") as f:
        json.dump({"rows": os.path.join(tmp, "rows.npy"), "order": os.path.join(tmp, "order.npy"), "d_in": val.shape[1],
                   "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": args.steps, "lr": lr,
                   "seed": args.seed, "init_rows": min(32768, len(order)), "tmp": tmp}, f)

    only = set(args.only.split(",")) if args.only else None
    workers, skipped = [], []
    for label, name, peer in TRAINERS:
        if only is not None and name not in only:
            continue
        if peer and not os.path.exists(PEERS):
            skipped.append(f"{label}: skipped, no peers environment at {PEERS} (make -C shell peers)")
            continue
        env = ({**os.environ, "PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"} if peer else
               {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        workers.append(Worker(label, name, PEERS if peer else sys.executable, setup, os.path.join(tmp, f"{name}.log"), env))
    for w in workers:
        w.ask({})  # {"ready": true}, or the import error
    for done in range(0, args.steps, args.round):
        n = min(args.round, args.steps - done)
        for w in workers:
            answer = w.ask({"steps": n})
            if answer is not None:
                w.cpu += answer["cpu"]
                w.steps += n
        print(f"round {done // args.round + 1}/{math.ceil(args.steps / args.round)} done", file=sys.stderr)
    results = []
    for i, w in enumerate(workers):
        path = os.path.join(tmp, f"weights-{i}.npz")
        if w.ask({"weights": path}) is not None:
            results.append((w, fvu(dict(np.load(path)), val, args.k)))
            w.close()
        else:
            skipped.append(f"{w.label}: skipped ({w.error})")

    print(f"bench-peers: {source}; {len(val)} held-out rows; d_in {val.shape[1]}, d_sae {args.d_sae}, k {args.k}, "
          f"batch {args.batch}, lr {lr:.3g} (constant), {args.steps} steps in rounds of {args.round}, one thread each")
    base = next((w.steps * args.batch / w.cpu for w, _ in results if w.label == "ssae"), None)
    print("| trainer | tokens per CPU-second | ratio to ssae | held-out FVU |")
    print("|---|---|---|---|")
    for w, score in results:
        rate = w.steps * args.batch / w.cpu
        print(f"| {w.label} | {rate:,.0f} | {rate / base:.2f} | {score:.4f} |" if base else
              f"| {w.label} | {rate:,.0f} | - | {score:.4f} |")
    if any(w.label.endswith("*") for w, _ in results):
        print("* without decoder-norm rescaling: with it (SAELens's default) use_sparse_activations fails in backward "
              "under torch 2.13")
    for line in skipped:
        print(line)
    print(f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {time.monotonic() - started:.0f} s "
          f"wall; worker logs in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
