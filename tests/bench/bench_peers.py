"""Benchmark ssae's training against the field's libraries as trainers: ssae (its real Trainer.train_step), SAELens
6.54.12, sparsify 1.3.3 (no Triton) and dictionary_learning 0.1.0 train SAEs on the same rows in the same order
(d_sae, k, batch, steps), one thread each, each peer once with its own standard recipe (its optimiser, learning
rate, schedule, decoder init, decoder-bias start, raw inputs) and once with ssae's (ssae's learning rate and
schedule from sae.optim.lr_at, inputs scaled by ssae's act_scale, b_dec at ssae's geometric median; the peer's
own step, gradient clipping included).  Every schedule is sized to its budget.

TopK (--architectures topk): --steps 200,1000 (the default) runs every trainer for 200 steps, then the
--long-trainers (the slowest peers left out) for 1,000, on the same rows; the longer budget is what fits about an
hour on 2 CPU cores (200,2000 doubles it).  Each trainer is a persistent worker process
(peers_worker.py; the peers run in the peers venv) and they take turns, `--round` steps at a time, so drifting
machine load hits all alike.  Printed, from one evaluator on the same held-out rows and the weights each worker
hands back: at the budget, tokens per CPU-second of each worker's training steps (its own process time) and the
ratio to sparsify's, held-out FVU, the fraction of latents that fire on no held-out row, L0; and at equal
CPU-seconds, each trainer's last evaluation (every --eval-every steps) within the CPU time ssae took for the
whole budget.

BatchTopK and JumpReLU (--architectures batchtopk,jumprelu; the first budget only): ssae, SAELens and
dictionary_learning, own recipe and ssae's (sparsify trains TopK only, and its rows say so).  The evaluator
applies each SAE's inference rule, f = ReLU(pre) where pre > threshold, with the thresholds each library
encodes with at inference: BatchTopK's running threshold (SAELens's topk_threshold, saved as its JumpReLU
threshold on every latent; dictionary_learning's BatchTopKSAE.threshold; ssae's), JumpReLU's learnt one per
latent.  Equal L0: BatchTopK trains every SAE at the same k (a mean over the batch), but the thresholds make
the held-out L0s differ (by a factor 3 at 200 steps), so each L0 is printed beside its FVU, and each SAE is
scored at L0 --k exactly too, by BatchTopK's training rule over held-out batches of --batch rows.  JumpReLU's
L0 follows each library's own sparsity knob (ssae's --l0, SAELens's l0_coefficient, both weighing L0 against
the squared error; dictionary_learning's target_l0, the L0 its penalty aims at); --jumprelu-sweep runs each
trainer once per value of its library's knob, and the FVU at L0 --k is read off a trainer's runs linear in log
L0 between the two whose L0s bracket it (no extrapolation: "not bracketed" when none do), and each peer's run
gets ssae's FVU at that run's L0 the same way; every run's raw (L0, FVU) is printed too.  The default sweep spans ssae's --l0 a
factor 10 either side of its default and runs each peer once, at its default coefficient (SAELens) or at the
target --k (dictionary_learning).  A JumpReLU threshold moves by about the learning rate a step under Adam, so
at the default budget no trainer's L0 comes near 32 (docs/benchmarks.md): the sweep then brackets nothing and
the table says so.

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
import signal
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
def evaluate(w: dict, x: torch.Tensor, k: int, chunk: int = 2048, batch_topk: bool = False) -> dict:
    """The one evaluator, with each SAE's own inference rule: pre = relu((x * scale - b_dec) @ W_enc + b_enc);
    f = its top k per row (TopK), or pre where pre > threshold, the SAE's threshold per latent (BatchTopK, as
    SAELens and dictionary_learning encode at inference with their running threshold, and JumpReLU);
    x_hat = (f @ W_dec + b_dec) / scale.  FVU, the mean L0, and the fraction of latents that fire on none of
    the rows (dead).  `batch_topk`: BatchTopK's training rule instead, the k x chunk largest of each chunk of
    rows, so that every SAE is scored at L0 k exactly."""
    t = {name: torch.from_numpy(np.asarray(v)) for name, v in w.items()}
    scale, threshold = float(t["scale"]), t.get("threshold")
    sse, l0 = 0.0, 0.0
    fired = torch.zeros(t["W_dec"].shape[0], dtype=torch.bool)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        pre = torch.relu((xs * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        if batch_topk:
            values, index = pre.flatten().topk(k * len(xs))
            f = torch.zeros_like(pre).flatten().scatter(-1, index, values).view_as(pre)
        elif threshold is None:
            values, index = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, index, values)
        else:  # a threshold below 0 (dictionary_learning's before its first update) passes every positive pre
            f = pre * (pre > threshold)
        x_hat = (f @ t["W_dec"] + t["b_dec"]) / scale
        sse += float((xs - x_hat).double().pow(2).sum())
        on = f > 0
        l0 += float(on.sum())
        fired |= on.any(0)
    return {"fvu": sse / float((x - x.mean(0)).double().pow(2).sum()), "l0": l0 / len(x),
            "dead": float(1 - fired.float().mean())}


def fvu_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """The FVU at `l0` from a sweep's (L0, FVU) points: linear in log L0 between the two points that bracket
    it (the nearest on each side); None when no two points bracket it (no extrapolation)."""
    below = [p for p in points if p[0] <= l0]
    above = [p for p in points if p[0] >= l0]
    if not below or not above:
        return None
    (l0_a, fvu_a), (l0_b, fvu_b) = max(below), min(above)
    if l0_a == l0_b:
        return fvu_a
    share = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
    return fvu_a + share * (fvu_b - fvu_a)


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
ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
TOPK_ONLY = ("sparsify",)  # sparsify trains TopK SAEs only
# each library's JumpReLU sparsity knob, as a spec sets it (ssae+l0=V, saelens+sparsity=V), and its sweep: ssae's
# --l0 and SAELens's l0_coefficient weigh L0 against the squared error (SAELens's summed over d_in, ssae's
# averaged: ssae's l0 x d_in is SAELens's coefficient); dictionary_learning's target_l0 is the L0 it aims at
SPARSITY = {"ssae": "l0", "saelens": "sparsity", "dictionary_learning": "sparsity", "sparsify": "sparsity"}
SPARSITY_WORDS = {"ssae": "--l0", "saelens": "l0_coefficient", "dictionary_learning": "target_l0"}
DEFAULT_SWEEP = "ssae=0.001736:0.01736:0.0001736,saelens=1,dictionary_learning=32"


def schedule_of(spec: str, steps: int, ssae_cfg, architecture: str = "topk") -> str:
    """The recipe a trainer spec runs (peers_worker.py), in words."""
    name, _, rest = spec.partition("@")
    name, recipe = name.split("+")[0], rest.split("+")[0] or ("ssae" if name.startswith("ssae") else "own")
    # an ssae ablation's own schedule knobs (ssae+decay_fraction=0) change the words as they change the run; a
    # peer with ssae's recipe runs the schedule prepare() computed, whatever its spec says
    knobs = dict(p.split("=", 1) for p in without_sparsity(spec).split("+")[1:])
    schedule = {key: knobs.pop(key) for key in ("lr", "decay_fraction", "warmup_steps")
                if key in knobs and name.startswith("ssae")}
    lr = float(schedule.get("lr", ssae_cfg.lr))
    decay = float(schedule.get("decay_fraction", ssae_cfg.decay_fraction))
    warm = min(int(schedule.get("warmup_steps", ssae_cfg.warmup_steps)), steps // 10)
    ssae_words = (f"Adam {lr:.3g}, warm-up {warm}, "
                  + (f"decay to 0 over the last {decay:.0%}" if decay else "constant")
                  + ", normalised inputs, b_dec median")
    if name.startswith("ssae") or recipe == "ssae":
        words = ssae_words + ("; clip 1" if name in ("dictionary_learning", "saelens") else "") + (
            ", Adam beta1 0" if (name, architecture) == ("dictionary_learning", "jumprelu") else "")
        rest = [f"{key}={v}" for key, v in knobs.items()]
        return words + (f"; {', '.join(rest)}" if rest else "")
    dl_warm = min(1000, steps // 10)
    return {("dictionary_learning", "topk"): f"Adam {ssae_cfg.lr:.3g}, warm-up {dl_warm}, constant; clip 1, raw "
                                             "inputs, b_dec median of batch 1",
            ("dictionary_learning", "batchtopk"): f"Adam {ssae_cfg.lr:.3g}, warm-up {dl_warm}, constant; clip 1, raw "
                                                  f"inputs, b_dec median of batch 1, threshold from step {dl_warm}",
            ("dictionary_learning", "jumprelu"): f"Adam 7e-05 (beta1 0), warm-up {dl_warm}, constant, L0 warm-up "
                                                 f"{min(2000, steps // 5)}; clip 1, raw inputs, b_dec 0",
            ("sparsify", "topk"): f"sign-SGD {5e-3 / math.sqrt(ssae_cfg.d_sae / 2**14):.3g}, schedule-free, raw "
                                  "inputs, b_dec mean of batch 1",
            ("saelens", "topk"): "Adam 3e-4 constant; clip 1, raw inputs, b_dec 0, decoder rows 0.1",
            ("saelens", "batchtopk"): "Adam 3e-4 constant; clip 1, raw inputs, b_dec 0, decoder rows 0.1",
            ("saelens", "jumprelu"): "Adam 3e-4 constant; clip 1, raw inputs, b_dec 0, decoder rows 0.1"}[
        name, architecture]


def prepare(args, steps: int, train: np.ndarray, val: torch.Tensor, rows_path: str) -> tuple[str, dict, object]:
    """The row order of a `steps` budget and ssae's recipe computed with ssae's own functions, saved in a new
    folder: (that folder, the setup the workers read but for its architecture, ssae's resolved FitConfig)."""
    from ssae_common.sae.config import FitConfig
    from ssae_common.sae.optim import lr_at
    from ssae_common.sae.train import act_scale_of, geometric_median

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
    return tmp, {"rows": rows_path, "order": os.path.join(tmp, "order.npy"), "d_in": val.shape[1],
                 "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": steps, "seed": args.seed,
                 "init_rows": init_rows, "tmp": tmp, "ssae_lr": cfg.lr, "ssae_act_scale": act_scale,
                 "ssae_b_dec": os.path.join(tmp, "b_dec.npy"),
                 "ssae_schedule": [lr_at(cfg, i) / cfg.lr for i in range(steps)]}, cfg


def library_of(spec: str) -> str:
    """The library a trainer spec names: NAME of NAME[@ssae][+KEY=VALUE...]."""
    return spec.split("@")[0].split("+")[0]


def label_of(spec: str) -> str:
    name = library_of(spec)
    recipe = spec[len(name):]
    return LIBRARIES[name] + (" (ssae's recipe)" if recipe.startswith("@ssae") else
                              f" ({recipe.lstrip('+').replace('+', ', ')})" if recipe else "")


def train_together(args, specs: list[str], setup: dict, steps: int, val: torch.Tensor, cfg, tag: str,
                   every: int) -> tuple[list, list[str]]:
    """Every trainer of `specs` for `steps` steps on the same rows in the same order, taking turns --round
    steps at a time, each evaluated on `val` every `every` steps and at the end: (the workers that finished,
    with their .curve, .cpu and .steps; one line for each that did not).  Interrupted (Ctrl-C), it ends its
    workers and raises KeyboardInterrupt."""
    tmp = setup["tmp"]
    path = os.path.join(tmp, f"setup-{tag}.json")
    with open(path, "w") as f:
        json.dump(setup, f)
    workers, skipped = [], []
    for i, spec in enumerate(specs):
        name = library_of(spec)
        peer, label = name != "ssae", label_of(without_sparsity(spec))
        if peer and not os.path.exists(PEERS):
            skipped.append(f"{label}: skipped, no peers environment at {PEERS} (make -C shell peers)")
            continue
        env = ({**os.environ, "PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"} if peer else
               {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        w = Worker(label, spec, PEERS if peer else sys.executable, path, os.path.join(tmp, f"worker-{tag}-{i}.log"),
                   env)
        w.spec, w.schedule, w.curve = spec, schedule_of(spec, steps, cfg, setup.get("architecture", "topk")), []
        workers.append(w)
    try:
        train_in_turns(args, workers, steps, val, tmp, tag, every, setup.get("architecture") == "batchtopk")
    except KeyboardInterrupt:
        for w in workers:
            w.proc.kill()
        raise
    results = []
    for w in workers:
        if w.error is None and w.steps == steps:
            results.append(w)
            w.close()
        else:
            skipped.append(f"{w.label}: skipped ({w.error})")
    with open(os.path.join(tmp, f"curves-{tag}.json"), "w") as f:
        json.dump([{"spec": w.spec, "label": w.label, "cpu": w.cpu, "steps": w.steps, "curve": w.curve}
                   for w in results], f)
    return results, skipped


def train_in_turns(args, workers: list, steps: int, val: torch.Tensor, tmp: str, tag: str, every: int,
                   batch_topk: bool) -> None:
    """The workers' turns, each evaluated every `every` steps (`batch_topk`: also at L0 --k exactly, by
    BatchTopK's training rule over chunks of --batch held-out rows)."""
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
                weights = os.path.join(tmp, f"weights-{tag}-{i}.npz")
                if w.ask({"weights": weights}) is not None:
                    tensors = dict(np.load(weights))
                    w.curve.append({"steps": w.steps, "cpu": w.cpu, **evaluate(tensors, val, args.k)})
                    if batch_topk:
                        w.curve[-1]["batch_topk"] = evaluate(tensors, val, args.k, args.batch, batch_topk=True)
        print(f"{tag}, {steps} steps: round {done // args.round + 1}/{math.ceil(steps / args.round)} done; "
              + "; ".join(f"{w.label.split(' ')[0]} {w.curve[-1]['fvu']:.4f}" for w in workers if w.curve),
              file=sys.stderr)


def header(args, steps: int, train: np.ndarray, val: torch.Tensor, source: str, load: float, what: str) -> str:
    need = steps * args.batch
    return (f"bench-peers: {source}; {len(val)} held-out rows; d_in {val.shape[1]}, d_sae {args.d_sae}, {what}, "
            f"batch {args.batch}; budget {steps} steps ({need:,} tokens, {need / len(train):.1f} passes over "
            f"{len(train):,} training rows) in rounds of {args.round}, one thread each; seed {args.seed}; load "
            f"average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


def run_budget(args, prepared, trainers: str, train: np.ndarray, val: torch.Tensor, source: str) -> None:
    """TopK: every trainer of `trainers` for the prepared budget's steps on the same rows in the same order;
    prints the tables."""
    started, load = time.monotonic(), os.getloadavg()[0]
    tmp, setup, cfg = prepared
    steps = setup["steps"]
    every = args.eval_every or max(args.round, steps // 10 // args.round * args.round)
    results, skipped = train_together(args, for_architecture(trainers.split(","), "topk"),
                                      {**setup, "architecture": "topk"}, steps, val, cfg, "topk", every)
    print(f"\n## Budget {steps} steps\n\n{header(args, steps, train, val, source, load, f'k {args.k}')}")
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
    print(f"{steps} steps: {time.monotonic() - started:.0f} s wall; worker logs and curves in {tmp}", file=sys.stderr)


def sweep_runs(specs: list[str], sweep: dict[str, list[str]]) -> list[list[str]]:
    """JumpReLU's runs in groups that train together: group i holds each spec with the i-th value of its
    library's sweep (a spec that sets its knob itself runs once, in the first group)."""
    groups: list[list[str]] = []
    for spec in specs:
        name = library_of(spec)
        knob = SPARSITY[name] + "="
        values = [None] if any(p.startswith(knob) for p in spec.split("+")[1:]) else sweep.get(name, [None])
        for i, value in enumerate(values):
            if len(groups) <= i:
                groups.append([])
            groups[i].append(spec if value is None else f"{spec}+{knob}{value}")
    return groups


def without_sparsity(spec: str) -> str:
    """The spec less its JumpReLU sparsity knob."""
    knob = SPARSITY[library_of(spec)] + "="
    return "+".join(p for p in spec.split("+") if not p.startswith(knob))


def for_architecture(specs: list[str], architecture: str) -> list[str]:
    """The specs with their JumpReLU sparsity knob dropped for another architecture (it reads none), once each."""
    return specs if architecture == "jumprelu" else list(dict.fromkeys(map(without_sparsity, specs)))


def knob_of(spec: str) -> str:
    """The JumpReLU sparsity setting a run's spec gives, in the library's words."""
    name = library_of(spec)
    value = next((p.split("=", 1)[1] for p in spec.split("+")[1:] if p.startswith(SPARSITY[name] + "=")), None)
    return f"{SPARSITY_WORDS[name]} {value}" if value is not None else f"{SPARSITY_WORDS[name]} default"


def run_thresholded(args, architecture: str, prepared, train: np.ndarray, val: torch.Tensor, source: str,
                    sweep: dict[str, list[str]]) -> None:
    """BatchTopK or JumpReLU: the trainers of --trainers that train it, at the first budget, on the same rows
    in the same order as TopK's; prints the tables."""
    started, load = time.monotonic(), os.getloadavg()[0]
    tmp, setup, cfg = prepared
    steps = setup["steps"]
    given = for_architecture(args.trainers.split(","), architecture)
    specs = [spec for spec in given if library_of(spec) not in TOPK_ONLY]
    not_trained = [label_of(spec) for spec in given if spec not in specs]
    groups = [specs] if architecture == "batchtopk" else sweep_runs(specs, sweep)
    results, skipped = [], []
    for i, group in enumerate(groups):
        try:  # the final evaluation only, unless --eval-every: these tables are at the budget
            done, missed = train_together(args, group, {**setup, "architecture": architecture}, steps, val, cfg,
                                          f"{architecture}-{i}", args.eval_every or steps)
        except KeyboardInterrupt:  # SIGTERM or SIGINT: the tables of the runs done so far
            skipped += [f"{spec}: not run (interrupted)" for g in groups[i:] for spec in g]
            break
        results += done
        skipped += missed
    name = {"batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}[architecture]
    what = f"k {args.k} (a mean over the batch while training)" if architecture == "batchtopk" else "L0 penalty"
    sweeping = architecture == "jumprelu"
    print(f"\n## {name}, budget {steps} steps\n\n{header(args, steps, train, val, source, load, what)}")
    print(f"\nHeld-out FVU, L0 and dead latents with each SAE's inference rule (the per-latent threshold), at {steps} "
          "steps" + ("" if sweeping else f"; and the FVU at L0 {args.k} exactly, by the training rule over batches of "
                     f"{args.batch} held-out rows") + ":\n")
    ours = next((w for w in results if w.spec.split("+")[0] == "ssae"), None)
    base = ours.steps * args.batch / ours.cpu if ours else None
    ssae_points = [(w.curve[-1]["l0"], w.curve[-1]["fvu"]) for w in results if w.spec.split("+")[0] == "ssae"]
    columns = ["trainer", "recipe"] + (["sparsity setting"] if sweeping else []) + [
        "tokens per CPU-second", "ratio to ssae", "held-out FVU", "L0", "dead latents"] + (
        ["ssae's FVU at this L0"] if sweeping else [f"FVU at L0 {args.k} (batch top-k)"])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for w in results:
        rate, end = w.steps * args.batch / w.cpu, w.curve[-1]
        row = [w.label, w.schedule] + ([knob_of(w.spec)] if sweeping else []) + [
            f"{rate:,.0f}", f"{rate / base:.2f}" if base else "-", f"{end['fvu']:.4f}", f"{end['l0']:.1f}",
            f"{end['dead']:.1%}"]
        if sweeping:
            at = fvu_at_l0(ssae_points, end["l0"])
            row.append("-" if w.label == "ssae" else f"{at:.4f}" if at is not None else "outside ssae's L0s")
        else:
            row.append(f"{end['batch_topk']['fvu']:.4f}")
        print("| " + " | ".join(row) + " |")
    for label in not_trained:
        print(f"| {label} | trains TopK only: no {name} |" + " - |" * (len(columns) - 2))
    if sweeping:
        print(f"\nAt equal L0 {args.k}: each trainer's held-out FVU linear in log L0 between the two runs of its sweep "
              f"whose L0s bracket {args.k} (none when no two do):\n")
        print("| trainer | runs | their L0s | FVU at L0 " + str(args.k) + " |")
        print("|---|---|---|---|")
        for label in dict.fromkeys(w.label for w in results):
            points = sorted((w.curve[-1]["l0"], w.curve[-1]["fvu"]) for w in results if w.label == label)
            at = fvu_at_l0(points, args.k)
            print(f"| {label} | {len(points)} | {', '.join(f'{p[0]:.1f}' for p in points)} | "
                  f"{f'{at:.4f}' if at is not None else 'not bracketed'} |")
    for line in skipped:
        print(line)
    sys.stdout.flush()
    print(f"{name}: {time.monotonic() - started:.0f} s wall; worker logs and curves in {tmp}", file=sys.stderr)


def parse_sweep(text: str) -> dict[str, list[str]]:
    """'NAME=V:V,NAME=V' -> {NAME: [V, V]}; SystemExit with one line when it is not that."""
    sweep = {}
    for item in filter(None, text.split(",")):
        name, _, values = item.partition("=")
        if name not in SPARSITY_WORDS or not values:
            raise SystemExit(f"--jumprelu-sweep: {item!r}: expected NAME=V[:V...] with NAME one of "
                             f"{', '.join(SPARSITY_WORDS)}")
        for value in values.split(":"):
            try:
                if not float(value) > 0:
                    raise ValueError
            except ValueError:
                raise SystemExit(f"--jumprelu-sweep: {item!r}: {value!r} is not a positive number") from None
        sweep[name] = values.split(":")
    return sweep


def check_spec(spec: str, architectures: list[str]) -> None:
    """SystemExit with one line when a trainer spec is not NAME[@ssae][+KEY=VALUE...] with KEY one its worker
    takes."""
    from dataclasses import fields

    from ssae_common.sae.config import FitConfig

    head, *pairs = spec.split("+")
    name, at, recipe = head.partition("@")
    if name not in LIBRARIES:
        raise SystemExit(f"--trainers: {spec!r}: expected one of {', '.join(LIBRARIES)}")
    if at and (recipe != "ssae" or name == "ssae"):
        raise SystemExit(f"--trainers: {spec!r}: a peer takes @ssae (ssae's recipe) and nothing else")
    keys = ({f.name for f in fields(FitConfig)} | {"clip", "dec_init", "beta2"} if name == "ssae" else
            {"sparsity"} if "jumprelu" in architectures and name in SPARSITY_WORDS else set())
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not value or key not in keys:
            raise SystemExit(f"--trainers: {spec!r}: {pair!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(keys)) or '(none: a peer takes +sparsity=V with jumprelu only)'}")


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
    ap.add_argument("--architectures", default=",".join(ARCHITECTURES),
                    help="comma-separated: topk (every budget), batchtopk and jumprelu (the first budget, the trainers "
                         "of --trainers that train them: sparsify trains TopK only)")
    ap.add_argument("--jumprelu-sweep", default=DEFAULT_SWEEP,
                    help="JumpReLU's sparsity settings, NAME=V:V... per library: ssae's --l0, SAELens's l0_coefficient, "
                         "dictionary_learning's target_l0; each trainer runs once per value, and its FVU at L0 --k "
                         "is read off its runs")
    args = ap.parse_args()
    budgets = [int(s) for s in args.steps.split(",")]
    architectures = args.architectures.split(",")
    for architecture in architectures:
        if architecture not in ARCHITECTURES:
            raise SystemExit(f"--architectures: {architecture!r}: expected some of {', '.join(ARCHITECTURES)}")
    for trainers in (args.trainers, args.long_trainers):
        for spec in trainers.split(","):
            check_spec(spec, architectures)
    sweep = parse_sweep(args.jumprelu_sweep)
    if any(b < 1 for b in budgets):
        raise SystemExit(f"--steps {args.steps}: budgets must be positive")
    every = args.eval_every
    if every and every % args.round:
        raise SystemExit(f"--eval-every {every} is not a multiple of --round {args.round}")

    # a stop (kill, or Ctrl-C, which a background job ignores) ends a JumpReLU sweep with the tables of its runs done
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rows, source = load_rows(args)
    g = np.random.default_rng(args.seed)
    perm = g.permutation(len(rows))
    val, train = torch.from_numpy(rows[perm[:args.val_rows]]), rows[perm[args.val_rows:]]
    del rows
    rows_path = os.path.join(tempfile.mkdtemp(prefix="ssae-bench-peers-"), "rows.npy")
    np.save(rows_path, train)
    train = np.load(rows_path, mmap_mode="r")  # the workers read it so too: one copy in memory
    for i, steps in enumerate(budgets):
        if "topk" not in architectures and i > 0:
            break
        prepared = prepare(args, steps, train, val, rows_path)
        if "topk" in architectures:
            run_budget(args, prepared, args.trainers if i == 0 else args.long_trainers, train, val, source)
        if i == 0:
            for architecture in architectures:
                if architecture != "topk":
                    run_thresholded(args, architecture, prepared, train, val, source, sweep)


if __name__ == "__main__":
    main()
