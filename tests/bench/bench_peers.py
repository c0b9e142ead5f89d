"""Benchmark ssae's TopK training against the field's libraries as trainers: ssae (its real Trainer.train_step),
SAELens 6.54.12, sparsify 1.3.3 (no Triton) and dictionary_learning 0.1.0 train TopK SAEs on the same rows in the
same order (d_sae, k, batch, steps), one thread each, each peer once with its own standard recipe (its optimiser,
learning rate, schedule, decoder init, decoder-bias start, raw inputs) and once with ssae's (ssae's learning rate
and schedule from sae.optim.lr_at, inputs scaled by ssae's act_scale, b_dec at ssae's geometric median; the
peer's own step, gradient clipping included).  Every schedule is sized to its budget: --steps 200,1000 (the
default) runs every trainer for 200 steps, then the --long-trainers (the slowest peers left out) for 1,000,
on the same rows; the longer budget is what fits about an hour on 2 CPU cores (200,2000 doubles it).  Each trainer is a persistent worker process (peers_worker.py; the peers run in the peers venv) and they take turns, `--round` steps
at a time, so drifting machine load hits all alike.  Printed, from one evaluator on the same held-out rows and
the weights each worker hands back: at the budget, tokens per CPU-second of each worker's training steps (its
own process time) and the ratio to sparsify's, held-out FVU, the fraction of latents that fire on no held-out
row, L0; and at equal CPU-seconds, each trainer's last evaluation (every --eval-every steps) within the CPU
time ssae took for the whole budget.

    make -C shell bench-peers          (or: python tests/bench/bench_peers.py [--store PATH] [--steps 200,1000] ...)

Rows: --store (an ssae activation store), else SmolLM2 blocks.6 activations of the shared general pool
(harvested once into $SSAE_WORKDIR and reused), else synthetic rows (said so).  --trainers picks the trainers;
ssae+FIELD=VALUE changes one of ssae-fit's options (and peers_worker.py's few ablation knobs), so the same
script gives the ablation tables.  The peers venv is $SSAE_PEERS_PYTHON or <repo>/.peers-venv (make -C shell
peers); a peer that is missing or fails to start is skipped with one line.
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
def evaluate(w: dict, x: torch.Tensor, k: int, chunk: int = 2048) -> dict:
    """The one evaluator: pre = relu((x * scale - b_dec) @ W_enc + b_enc), f = its top k per row,
    x_hat = (f @ W_dec + b_dec) / scale.  FVU, the mean L0, and the fraction of latents that fire on none of the
    rows (dead)."""
    t = {name: torch.from_numpy(np.asarray(v)) for name, v in w.items()}
    scale = float(t["scale"])
    sse, l0 = 0.0, 0.0
    fired = torch.zeros(t["W_dec"].shape[0], dtype=torch.bool)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        pre = torch.relu((xs * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        values, index = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, index, values)
        x_hat = (f @ t["W_dec"] + t["b_dec"]) / scale
        sse += float((xs - x_hat).double().pow(2).sum())
        on = f > 0
        l0 += float(on.sum())
        fired |= on.any(0)
    return {"fvu": sse / float((x - x.mean(0)).double().pow(2).sum()), "l0": l0 / len(x),
            "dead": float(1 - fired.float().mean())}


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


LIBRARIES = {"ssae": "ssae", "saelens": "SAELens 6.54.12", "sparsify": "sparsify 1.3.3 (no Triton)",
             "dictionary_learning": "dictionary_learning 0.1.0"}
DEFAULT_TRAINERS = ("ssae,dictionary_learning,dictionary_learning@ssae,sparsify,sparsify@ssae,saelens,saelens@ssae")
LONG_TRAINERS = "ssae,dictionary_learning,sparsify"


def schedule_of(spec: str, steps: int, ssae_cfg) -> str:
    """The recipe a trainer spec runs (peers_worker.py), in words."""
    name, _, rest = spec.partition("@")
    name, recipe = name.split("+")[0], rest.split("+")[0] or ("ssae" if name.startswith("ssae") else "own")
    warm = min(ssae_cfg.warmup_steps, steps // 10)
    ssae_words = (f"Adam {ssae_cfg.lr:.3g}, warm-up {warm}, decay to 0 over the last {ssae_cfg.decay_fraction:.0%}, "
                  "normalised inputs, b_dec median")
    if name.startswith("ssae") or recipe == "ssae":
        words = ssae_words + ("; clip 1" if name in ("dictionary_learning", "saelens") else "")
        knobs = spec.split("+")[1:]
        return words + (f"; {', '.join(knobs)}" if knobs else "")
    return {"dictionary_learning": f"Adam {ssae_cfg.lr:.3g}, warm-up {min(1000, steps // 10)}, constant; clip 1, "
                                   "raw inputs, b_dec median of batch 1",
            "sparsify": f"sign-SGD {5e-3 / math.sqrt(ssae_cfg.d_sae / 2**14):.3g}, schedule-free, raw inputs, "
                        "b_dec mean of batch 1",
            "saelens": "Adam 3e-4 constant; clip 1, raw inputs, b_dec 0, decoder rows 0.1"}[name]


def run_budget(args, steps: int, trainers: str, train: np.ndarray, val: torch.Tensor, source: str,
               rows_path: str) -> None:
    """Every trainer of `trainers` for `steps` steps on the same rows in the same order; prints the tables."""
    from ssae_common.sae.config import FitConfig
    from ssae_common.sae.optim import lr_at
    from ssae_common.sae.train import act_scale_of, geometric_median

    started, load = time.monotonic(), os.getloadavg()[0]
    every = args.eval_every or max(args.round, steps // 10 // args.round * args.round)
    g = np.random.default_rng([args.seed, steps])
    need = steps * args.batch
    order = np.concatenate([g.permutation(len(train)) for _ in range(math.ceil(need / len(train)))])[:need]
    tmp = tempfile.mkdtemp(prefix=f"{steps}-steps-", dir=os.path.dirname(rows_path))
    np.save(os.path.join(tmp, "order.npy"), order)
    # ssae's recipe, from ssae's own functions, for the peers that run it (@ssae)
    init_rows = min(32768, len(order))
    sample = np.ascontiguousarray(train[order[:init_rows]])
    cfg = FitConfig(architecture="topk", d_sae=args.d_sae, k=args.k, batch_size=args.batch,
                    train_tokens=need).resolve(d_in=val.shape[1], n_rows=need)
    act_scale = act_scale_of(sample)
    np.save(os.path.join(tmp, "b_dec.npy"), geometric_median(torch.from_numpy(sample) * act_scale).numpy())
    del sample
    setup = os.path.join(tmp, "setup.json")
    with open(setup, "w") as f:
        json.dump({"rows": rows_path, "order": os.path.join(tmp, "order.npy"), "d_in": val.shape[1],
                   "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": steps, "seed": args.seed,
                   "init_rows": init_rows, "tmp": tmp, "ssae_lr": cfg.lr, "ssae_act_scale": act_scale,
                   "ssae_b_dec": os.path.join(tmp, "b_dec.npy"),
                   "ssae_schedule": [lr_at(cfg, i) / cfg.lr for i in range(steps)]}, f)

    workers, skipped = [], []
    for i, spec in enumerate(trainers.split(",")):
        name = spec.split("@")[0].split("+")[0]
        peer = name != "ssae"
        recipe = spec[len(name):]
        label = LIBRARIES[name] + (" (ssae's recipe)" if recipe.startswith("@ssae") else
                                   f" ({recipe.lstrip('+').replace('+', ', ')})" if recipe else "")
        if peer and not os.path.exists(PEERS):
            skipped.append(f"{label}: skipped, no peers environment at {PEERS} (make -C shell peers)")
            continue
        env = ({**os.environ, "PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"} if peer else
               {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        w = Worker(label, spec, PEERS if peer else sys.executable, setup, os.path.join(tmp, f"worker-{i}.log"), env)
        w.schedule, w.curve = schedule_of(spec, steps, cfg), []
        workers.append(w)
    for w in workers:
        w.ask({})  # {"ready": true}, or the import error
    for done in range(0, steps, args.round):
        n = min(args.round, steps - done)
        for i, w in enumerate(workers):
            answer = w.ask({"steps": n})
            if answer is None:
                continue
            w.cpu += answer["cpu"]
            w.steps += n
            if w.steps % every == 0 or w.steps == steps:
                path = os.path.join(tmp, f"weights-{i}.npz")
                if w.ask({"weights": path}) is not None:
                    w.curve.append({"steps": w.steps, "cpu": w.cpu, **evaluate(dict(np.load(path)), val, args.k)})
        print(f"{steps} steps: round {done // args.round + 1}/{math.ceil(steps / args.round)} done; "
              + "; ".join(f"{w.label.split(' ')[0]} {w.curve[-1]['fvu']:.4f}" for w in workers if w.curve),
              file=sys.stderr)
    results = []
    for w in workers:
        if w.error is None and w.steps == steps:
            results.append(w)
            w.close()
        else:
            skipped.append(f"{w.label}: skipped ({w.error})")

    print(f"\n## Budget {steps} steps\n\nbench-peers: {source}; {len(val)} held-out rows; d_in {val.shape[1]}, "
          f"d_sae {args.d_sae}, k {args.k}, batch {args.batch}; budget {steps} steps ({need:,} tokens, "
          f"{need / len(train):.1f} passes over {len(train):,} training rows) in rounds of {args.round}, one thread "
          f"each; seed {args.seed}; load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    base = next((w.steps * args.batch / w.cpu for w in results if w.label.startswith("sparsify")), None)
    print(f"\nAt {steps} steps (equal steps and tokens):\n")
    print("| trainer | recipe | tokens per CPU-second | ratio to sparsify | held-out FVU | dead latents | L0 |")
    print("|---|---|---|---|---|---|---|")
    for w in results:
        rate, end = w.steps * args.batch / w.cpu, w.curve[-1]
        print(f"| {w.label} | {w.schedule} | {rate:,.0f} | {f'{rate / base:.2f}' if base else '-'} | "
              f"{end['fvu']:.4f} | {end['dead']:.1%} | {end['l0']:.1f} |")
    ours = next((w for w in results if w.label == "ssae"), None)
    if ours is not None:
        budget = ours.cpu
        print(f"\nAt equal CPU-seconds: each trainer's last held-out evaluation within the {budget:.0f} CPU-seconds "
              f"ssae took for its {steps} steps (a slower trainer is then part-way through its schedule):\n")
        print("| trainer | steps in that time | CPU-seconds | held-out FVU | dead latents |")
        print("|---|---|---|---|---|")
        for w in results:
            within = [c for c in w.curve if c["cpu"] <= budget * 1.001]
            if within:
                c = within[-1]
                print(f"| {w.label} | {c['steps']} | {c['cpu']:.0f} | {c['fvu']:.4f} | {c['dead']:.1%} |")
            else:
                print(f"| {w.label} | < {w.curve[0]['steps']} | - | - | - |")
    for line in skipped:
        print(line)
    sys.stdout.flush()
    with open(os.path.join(tmp, "curves.json"), "w") as f:
        json.dump({w.label: w.curve for w in results}, f)
    print(f"{steps} steps: {time.monotonic() - started:.0f} s wall; worker logs and curves.json in {tmp}",
          file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="an ssae activation store (default: harvest SmolLM2 blocks.6 of the shared pool)")
    ap.add_argument("--harvest-tokens", type=int, default=300_000, help="rows to harvest without --store")
    ap.add_argument("--steps", default="200,1000",
                    help="the budgets, comma-separated: every trainer's schedule is sized to its budget; the first "
                         "runs --trainers, the later ones --long-trainers")
    ap.add_argument("--round", type=int, default=10, help="steps each trainer runs per turn")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out FVU every this many steps too (a multiple of --round; default: a tenth of the "
                         "budget), for the comparison at equal CPU-seconds")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--val-rows", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainers", default=DEFAULT_TRAINERS,
                    help="comma-separated: ssae, saelens, sparsify, dictionary_learning; NAME@ssae runs a peer with "
                         "ssae's recipe (schedule, input scaling, b_dec); ssae+FIELD=VALUE changes one of ssae-fit's "
                         "options (e.g. ssae+decay_fraction=0), as the ablations do")
    ap.add_argument("--long-trainers", default=LONG_TRAINERS,
                    help="the trainers of the budgets after the first (the slowest peers left out, so the longer "
                         "budget fits the benchmark's time)")
    args = ap.parse_args()
    budgets = [int(s) for s in args.steps.split(",")]
    for trainers in (args.trainers, args.long_trainers):
        for spec in trainers.split(","):
            if spec.split("@")[0].split("+")[0] not in LIBRARIES:
                raise SystemExit(f"--trainers: {spec!r}: expected one of {', '.join(LIBRARIES)}")
    if any(b < 1 for b in budgets):
        raise SystemExit(f"--steps {args.steps}: budgets must be positive")
    every = args.eval_every
    if every and every % args.round:
        raise SystemExit(f"--eval-every {every} is not a multiple of --round {args.round}")

    rows, source = load_rows(args)
    g = np.random.default_rng(args.seed)
    perm = g.permutation(len(rows))
    val, train = torch.from_numpy(rows[perm[:args.val_rows]]), rows[perm[args.val_rows:]]
    del rows
    rows_path = os.path.join(tempfile.mkdtemp(prefix="ssae-bench-peers-"), "rows.npy")
    np.save(rows_path, train)
    for i, steps in enumerate(budgets):
        run_budget(args, steps, args.trainers if i == 0 else args.long_trainers, train, val, source, rows_path)


if __name__ == "__main__":
    main()
