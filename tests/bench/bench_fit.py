"""Benchmark ssae-fit: training tokens/s (8x and 16x expansion at d_in = 576) of ERM against each TERM
variant (--tilt 500, --tilt-ess 0.1, --tilt-ess 0.1 --tilt-groups token; ratio to ERM: the overhead), the
share of this machine's measured float32 matmul FLOP/s achieved (12 * d_in * d_sae FLOPs per token per
step), peak memory of whole `ssae-fit` runs over two store sizes, and the time of a 5-value tilt sweep
from one `ssae-fit` call against one SAE (whole runs, the paper's SSAE finetuning size and this bench's).

    make -C shell bench-fit          (or: python tests/bench/bench_fit.py [--quick] [--sweep-only])

Reference numbers (matmul FLOP/s, the ERM rate) are measured in the same run, so ratios are comparable; the
variants take turns step by step (train_rates), and the TERM computation is also timed alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

D_IN = 576
VOCAB = 49152
# (label, FitConfig fields) of the variants timed against ERM
VARIANTS = [("ERM", {}), ("t=500", {"tilt": 500.0}), ("ess=0.1", {"tilt_ess": 0.1}),
            ("ess=0.1+token", {"tilt_ess": 0.1, "tilt_groups": "token"})]


def matmul_flops(batch: int, d_sae: int, seconds: float = 3.0) -> float:
    """float32 FLOP/s of the training step's shapes (x @ W_enc) on this machine, best of a few."""
    x, w = torch.randn(batch, D_IN), torch.randn(D_IN, d_sae)
    x @ w
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        x @ w
        best = max(best, 2 * batch * D_IN * d_sae / (time.perf_counter() - t0))
    return best


def make_store(path: str, rows: int, seed: int = 0) -> str:
    from ssae_common.data.activations import ActivationWriter

    g = np.random.default_rng(seed)
    dirs = g.standard_normal((4096, D_IN)).astype(np.float32) / np.sqrt(D_IN)
    w = ActivationWriter(path, d_model=D_IN, dtype="float16", attrs={"model": "bench", "hook": "bench"}, resume=False)
    w.add_docs(["d"], ["t"], [0])
    for s in range(0, rows, 8192):
        n = min(8192, rows - s)
        codes = (g.random((n, 4096), dtype=np.float32) < 0.008) * g.exponential(1.0, (n, 4096)).astype(np.float32)
        acts = codes @ dirs + 0.1
        tokens = np.minimum(g.zipf(1.2, n), VOCAB) - 1  # Zipfian token ids, for --tilt-groups token
        w.add_rows(acts, tokens.astype(np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32))
        w.checkpoint(1, 1, 0)
    w.finish()
    return path


def train_rates(store: str, d_sae: int, batch: int, steps: int) -> dict[str, float]:
    """Steady-state tokens/s of the training loop (data stream included) of every VARIANT, after one
    warm-up step each.  The variants take turns step by step, so the load of a shared machine, which
    drifts over seconds, weighs on all of them alike."""
    from ssae_common.data.activations import ActivationStore
    from ssae_common.data.batches import ActivationStream
    from ssae_common.sae.config import FitConfig
    from ssae_common.sae.train import init_sae
    from ssae_common.sae.trainer import Trainer

    st = ActivationStore(store)
    runs, seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for label, variant in VARIANTS:
            cfg = FitConfig(architecture="topk", d_sae=d_sae, k=32, **variant, lr=1e-4, batch_size=batch,
                            train_tokens=batch * (steps + 1), val_tokens=0, warmup_steps=1,
                            dead_tokens=10_000_000).resolve(D_IN, batch * (steps + 1))
            stream = ActivationStream([st], batch, 0, shuffle_rows=32768, val_rows=0,
                                      tokens=cfg.tilt_groups == "token")
            sae = init_sae(cfg, D_IN, stream.sample(4096), None)
            runs[label] = (stream, Trainer(cfg, sae, stream, os.path.join(folder, label), np.empty((0, D_IN), np.float32)))
            seconds[label] = 0.0
        for s in range(steps + 1):
            for label, (stream, trainer) in runs.items():
                if stream.tokens:
                    rows, ids = stream.batch_with_tokens(s)
                    ids = torch.from_numpy(ids)
                else:
                    rows, ids = stream.batch(s), None
                t0 = time.perf_counter()
                trainer.train_step(torch.from_numpy(rows) * trainer.sae.act_scale, ids)
                if s:  # step 0 warms up
                    seconds[label] += time.perf_counter() - t0
    for stream, _ in runs.values():
        stream.close()
    st.close()
    return {label: steps * batch / seconds[label] for label in runs}


def term_op_seconds(batch: int, repeats: int = 20) -> dict[str, float]:
    """Seconds per step of the TERM computation alone (on `batch` per-token losses, forward and backward):
    what each variant adds to a training step, free of the matmuls' noise."""
    from ssae_common.sae.term import group_means, solve_tilt, tilted_loss

    g = torch.Generator().manual_seed(0)
    losses = torch.distributions.Gamma(2.0, 20.0).sample((batch,))
    ids = torch.from_numpy(np.minimum(np.random.default_rng(0).zipf(1.2, batch), VOCAB) - 1)
    del g

    def run(variant: dict) -> None:
        x = losses.clone().requires_grad_(True)
        v = group_means(x, ids) if variant.get("tilt_groups") == "token" else x
        t = solve_tilt(v, variant["tilt_ess"]) if "tilt_ess" in variant else variant.get("tilt", 0.0)
        tilted_loss(v, t).backward()

    out = {}
    for label, variant in VARIANTS:
        run(variant)
        t0 = time.perf_counter()
        for _ in range(repeats):
            run(variant)
        out[label] = (time.perf_counter() - t0) / repeats
    return out


def peak_rss_of_fit(store: str, out: str) -> tuple[float, float]:
    """Peak resident memory (MiB) and wall time of a whole `ssae-fit` run in a child process."""
    code = ("import resource, sys; from ssae_tools.fit import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, store, "--d-sae", "4608", "--k", "32", "--batch-size", "1024",
                        "--train-tokens", str(1024 * 40), "--shuffle-rows", "32768", "--val-tokens", "4096",
                        "--tilt", "500", "-q", "-o", out], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return float(r.stderr.strip().splitlines()[-1]), time.perf_counter() - t0


SWEEP_TILTS = "0,1,10,100,500"
# (label, store rows, ssae-fit size options, finetuned from a parent of that size): the paper's SSAE finetuning
# (d_sae 2304 = 4 x 576, batch 4096, 100k tokens) and this bench's default (8x expansion, batch 2048), 20 steps
SWEEP_SIZES = [
    ("paper SSAE", 131072, ["--d-sae", "2304", "--k", "32", "--batch-size", "4096", "--train-tokens", "100000"], True),
    ("bench", 65536, ["--d-sae", "4608", "--k", "32", "--batch-size", "2048", "--train-tokens", "40960"], False),
]


def fit_seconds(args: list[str], device: str = "cpu") -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one whole `ssae-fit` run in a child process."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ssae_tools.fit", *args, "-q", "--force", "--device", device],
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(err.read().decode())
    return wall, usage.ru_utime + usage.ru_stime


def sweep_vs_one(tmp: str, repeats: int, device: str = "cpu") -> dict:
    """Whole `ssae-fit` runs, `--tilt SWEEP_TILTS` (5 SAEs, one call) against `--tilt 0` (one SAE), same
    store and settings, taking turns (the order swapped every round), at each SWEEP_SIZES size; and the
    one SAE with --no-prefetch (what building batches in the background saves)."""
    print(f"\n5-value tilt sweep (--tilt {SWEEP_TILTS}) from one ssae-fit call against one SAE (--tilt 0), "
          f"whole runs on {device}, {repeats} interleaved rounds, mean seconds:", flush=True)
    print(f"{'size':>11} {'one SAE wall':>13} {'sweep wall':>11} {'wall ratio':>11} {'one SAE CPU':>12} "
          f"{'sweep CPU':>10} {'CPU ratio':>10} {'one, no prefetch':>17} {'off/on wall':>13}", flush=True)
    out = {}
    for label, rows, size, finetune in SWEEP_SIZES:
        store = make_store(os.path.join(tmp, f"sweep{rows}.h5"), rows, seed=2)
        args = [store, *size]
        if finetune:
            parent = os.path.join(tmp, f"parent{rows}")
            fit_seconds([store, *size[:4], "--train-tokens", "8192", "--batch-size", "4096", "-o", parent], device)
            args += ["--init", parent, "--lr", "3e-4"]
        runs = {"one": [*args, "--tilt", "0", "-o", os.path.join(tmp, "one")],
                "sweep": [*args, "--tilt", SWEEP_TILTS, "-o", os.path.join(tmp, "sweep")],
                "no prefetch": [*args, "--tilt", "0", "--no-prefetch", "-o", os.path.join(tmp, "one")]}
        times = {name: [] for name in runs}
        for r in range(repeats):
            for name in (runs if r % 2 == 0 else reversed(list(runs))):
                times[name].append(fit_seconds(runs[name], device))
        mean = {name: np.mean(np.array(t), axis=0) for name, t in times.items()}
        ratio = mean["sweep"] / mean["one"]
        off = mean["no prefetch"][0] / mean["one"][0]
        out[label] = {"one_wall_cpu": mean["one"].tolist(), "sweep_wall_cpu": mean["sweep"].tolist(),
                      "ratio_wall_cpu": ratio.tolist(), "no_prefetch_wall_cpu": mean["no prefetch"].tolist()}
        print(f"{label:>11} {mean['one'][0]:>13.1f} {mean['sweep'][0]:>11.1f} {ratio[0]:>10.2f}x "
              f"{mean['one'][1]:>12.1f} {mean['sweep'][1]:>10.1f} {ratio[1]:>9.2f}x "
              f"{mean['no prefetch'][0]:>17.1f} {off:>13.3f}", flush=True)
        os.remove(store)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller stores")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory comparison")
    ap.add_argument("--throughput-only", action="store_true", help="skip the peak-memory and sweep comparisons")
    ap.add_argument("--sweep-only", action="store_true", help="only the tilt sweep against one SAE")
    ap.add_argument("--sweep-repeats", type=int, default=2, help="interleaved rounds of the sweep comparison")
    ap.add_argument("--sweep-device", default="cpu", help="--device of the sweep comparison's fits (cpu, cuda)")
    args = ap.parse_args()
    if args.sweep_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps({"sweep": sweep_vs_one(tmp, args.sweep_repeats, args.sweep_device)}))
        return
    steps = 2 if args.quick else 5
    threads = torch.get_num_threads()
    print(f"# ssae-fit benchmark: CPU, torch {torch.__version__}, {threads} threads, d_in {D_IN}, "
          f"batch {args.batch_size}, TopK k=32, {steps} timed steps each", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(os.path.join(tmp, "train.h5"), 65536)
        labels = [label for label, _ in VARIANTS]
        print(f"{'d_sae':>6} {'matmul GFLOP/s':>15} {'ERM %peak':>10} "
              + " ".join(f"{label + ' tok/s':>19}" for label in labels) + " "
              + " ".join(f"{label + '/ERM':>17}" for label in labels[1:]), flush=True)
        for expansion in (() if args.memory_only else (8, 16)):
            d_sae = D_IN * expansion
            peak = matmul_flops(args.batch_size, d_sae)
            rate = train_rates(store, d_sae, args.batch_size, steps)
            per_token = 12 * D_IN * d_sae
            erm = rate["ERM"]
            results[d_sae] = dict(peak_gflops=peak / 1e9, tokens_per_s=rate, erm_share=erm * per_token / peak,
                                  ratio_to_erm={label: rate[label] / erm for label in labels[1:]})
            r = results[d_sae]
            print(f"{d_sae:>6} {r['peak_gflops']:>15.1f} {100 * r['erm_share']:>9.1f}% "
                  + " ".join(f"{rate[label]:>19.0f}" for label in labels) + " "
                  + " ".join(f"{r['ratio_to_erm'][label]:>17.3f}" for label in labels[1:]), flush=True)

        if not args.memory_only:
            op = term_op_seconds(args.batch_size)
            step_s = args.batch_size / results[D_IN * 8]["tokens_per_s"]["ERM"]
            print(f"\nthe TERM computation alone, batch {args.batch_size} (forward + backward), and as a share of an "
                  f"ERM step at d_sae {D_IN * 8} ({step_s:.2f} s):", flush=True)
            for label, sec in op.items():
                print(f"{label:>15} {1e3 * sec:8.2f} ms {100 * sec / step_s:8.3f}%", flush=True)
            results["term_op_seconds"] = op

        if args.throughput_only:
            print(json.dumps({"throughput": results}))
            return
        sizes = (50_000, 200_000) if not args.quick else (20_000, 80_000)
        print(f"\n{'store rows':>10} {'store MiB':>10} {'peak RSS MiB':>13} {'fit s':>7}", flush=True)
        mem = {}
        for rows in sizes:
            path = make_store(os.path.join(tmp, f"s{rows}.h5"), rows, seed=1)
            rss, wall = peak_rss_of_fit(path, os.path.join(tmp, f"sae{rows}"))
            mem[rows] = rss
            print(f"{rows:>10} {os.path.getsize(path) / 2**20:>10.0f} {rss:>13.0f} {wall:>7.1f}", flush=True)
            os.remove(path)
        a, b = sizes
        print(f"\npeak memory ratio ({b} vs {a} rows, {b // a}x the data): {mem[b] / mem[a]:.3f}")
        sweep = sweep_vs_one(tmp, 1 if args.quick else args.sweep_repeats, args.sweep_device)
    print(json.dumps({"throughput": results, "peak_rss_mib": mem, "sweep": sweep}))


if __name__ == "__main__":
    main()
