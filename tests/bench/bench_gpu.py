"""GPU benchmark: fit, harvest and eval throughput on CUDA, each as a share of the matmul peak measured on
the same device in the same run (bf16 and TF32 / strict float32 GEMMs).

    make -C shell bench-gpu                       (python tests/bench/bench_gpu.py [--out results.json])
    python tests/bench/bench_gpu.py --dry         the same code path on the CPU, tiny sizes (tests/test_gpu.py)
    python tests/bench/bench_gpu.py --model FOLDER --random-weights
                                                  a randomly initialised model of FOLDER's config.json (and its
                                                  tokenizer): the same shapes, so the same time, without the
                                                  weights (shell/offline-bench.sh, where they cannot travel)

Each figure runs the package's own entry points with the defaults a user gets on CUDA (TF32 matmuls,
bfloat16 autocast in ssae-fit; docs/scale.md), and ssae-fit also with --no-autocast:
- fit: whole `fit()` runs (data stream, steps, checkpoints) of two lengths; tokens/s is the difference of
  tokens over the difference of seconds, so start-up (store, model, output) cancels. With autocast, dense
  and sparse decoder (`--decoder`; auto is dense on CUDA until this row says otherwise), and without
  autocast. FLOPs: the dense count, 12 x d_in x d_sae per token (the sparse step does about a third of it,
  so its share is an upper bound).
- harvest: whole `harvest()` runs of two lengths, the same difference; FLOPs: 2 x the weights of the
  layers up to the hook + attention, per token.
- eval: evaluate_docs over the same pre-cut batches with 1, 4 and 13 random TopK SAEs (the shared-prefix
  path; bench_eval.py compares it with whole passes); FLOPs: the whole clean pass, the layers above the
  hook once for zero ablation and once per SAE, and each SAE's encode + decode.
Share of peak: achieved FLOP/s over the GEMM peak of the precision the work runs in (bf16 for the
autocast fit, TF32 for the rest; strict float32 when SSAE_TF32=0). Prints a table; --out writes JSON.
Sized to finish in a few minutes on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from bench_eval import eval_seconds, random_topk_sae  # noqa: E402
from bench_fit import D_IN, make_store  # noqa: E402
from helpers_docs import write_docs  # noqa: E402

COLUMNS = ("bench", "setting", "tokens/s", "TFLOP/s", "peak", "share of peak")
# sizes on the GPU and in the dry run (CPU, tiny model): the same code path
SIZES = {
    "gpu": dict(gemm=8192, gemm_seconds=2.0, store_rows=1 << 18, d_sae=8 * D_IN, fit_batch=4096, fit_steps=(100, 600),
                docs=4000, harvest_tokens=(50_000, 500_000), harvest_batch=64, eval_tokens=32_768, eval_batch=32,
                n_saes=(1, 4, 13), context=128),
    "dry": dict(gemm=256, gemm_seconds=0.2, store_rows=8192, d_sae=2 * D_IN, fit_batch=256, fit_steps=(2, 6),
                docs=300, harvest_tokens=(500, 2000), harvest_batch=8, eval_tokens=256, eval_batch=4, n_saes=(1, 4),
                context=32),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(device: str, dtype: torch.dtype, n: int, seconds: float, tf32: bool = True) -> float:
    """Best FLOP/s of an n x n x n GEMM in `dtype` (float32: TF32 or strict, per `tf32`)."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        sync(device)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            sync(device)
            best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def two_lengths(run, small: int, large: int) -> float:
    """Units per second of `run(n)` from two lengths: (large - small) / (t(large) - t(small)); NaN when noise
    made the longer run no slower."""
    seconds = []
    for n in (small, large):
        t0 = time.perf_counter()
        run(n)
        seconds.append(time.perf_counter() - t0)
    return (large - small) / (seconds[1] - seconds[0]) if seconds[1] > seconds[0] else float("nan")


def docs_file(path: str, n: int) -> str:
    """Benchmark documents (helpers_docs), or generated text where neither source is installed."""
    try:
        return write_docs(path, n)
    except (AttributeError, OSError, TypeError):
        from helpers import sample_docs, write_jsonl

        return write_jsonl(path, sample_docs(n, 300, seed=1))


def matmul_weights(blocks) -> int:
    """Multiply-accumulates per token of the blocks' weight matrices."""
    return sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2)


def bench_fit(device: str, size: dict, tmp: str) -> list[dict]:
    from ssae_common.core.runtime import RunContext
    from ssae_common.sae import FitConfig, fit

    store = make_store(os.path.join(tmp, "fit.h5"), size["store_rows"])
    batch, d_sae = size["fit_batch"], size["d_sae"]
    rows = []
    for autocast, decoder in ((True, "dense"), (True, "sparse"), (False, "dense")):
        def run(steps, autocast=autocast, decoder=decoder):
            cfg = FitConfig(architecture="topk", d_sae=d_sae, k=32, batch_size=batch, train_tokens=steps * batch,
                            val_tokens=0, autocast=autocast, decoder=decoder)
            fit(cfg, [store], out=os.path.join(tmp, f"sae-{autocast}-{decoder}-{steps}"),
                context=RunContext(device_spec=device, quiet=True, force=True))

        run(size["fit_steps"][0])  # warm-up: the first run of a setting also pays for its kernels' set-up
        rate = batch * two_lengths(run, *size["fit_steps"])
        use_bf16 = autocast and device.startswith("cuda")  # autocast is CUDA-only
        rows.append(dict(bench="fit", setting=f"topk d_sae {d_sae} k 32 batch {batch}, "
                                              f"{'autocast bf16' if autocast else '--no-autocast'}, {decoder} decoder",
                         tokens_per_s=rate, flops=rate * 12 * D_IN * d_sae, peak="bf16" if use_bf16 else fp32_name()))
    return rows


def bench_harvest(device: str, size: dict, tmp: str, model: str, hook: str, lm) -> list[dict]:
    from ssae_common.core.runtime import RunContext
    from ssae_common.data.config import HarvestConfig
    from ssae_common.data.stage import harvest

    docs = docs_file(os.path.join(tmp, "harvest.jsonl"), size["docs"])

    def run(tokens):
        cfg = HarvestConfig(model=model, hook=hook, context_size=size["context"], batch_size=size["harvest_batch"],
                            max_tokens=tokens)
        harvest(cfg, [docs], out=os.path.join(tmp, f"acts-{tokens}.h5"),
                context=RunContext(device_spec=device, quiet=True, force=True))

    rate = two_lengths(run, *size["harvest_tokens"])
    start = lm.resume_layer(hook)
    per_token = 2 * matmul_weights(lm.bridge.blocks[:start]) + 2 * start * size["context"] * lm.d_model
    return [dict(bench="harvest", setting=f"{hook}, batch {size['harvest_batch']} x {size['context']}",
                 tokens_per_s=rate, flops=rate * per_token, peak=fp32_name())]


def bench_eval(device: str, size: dict, tmp: str, hook: str, lm) -> list[dict]:
    from ssae_common.core.records import iter_docs
    from ssae_common.eval.splice import DocsEvalConfig, window_batches

    docs = docs_file(os.path.join(tmp, "eval.jsonl"), size["docs"])
    cfg = DocsEvalConfig(hook=hook, context_size=size["context"], batch_size=size["eval_batch"])
    batches = list(window_batches(lm, iter_docs([docs]), cfg, token_budget=size["eval_tokens"]))
    n_tokens = sum(int(b.act_pos.sum()) for b in batches)
    n_real = sum(int(b.real.sum()) for b in batches)
    saes = [(f"s{i}", random_topk_sae(lm.d_model, i).to(device)) for i in range(max(size["n_saes"]))]
    start, n_layers = lm.resume_layer(hook), lm.n_layers
    vocab = int(lm.bridge.cfg.d_vocab)
    attention = 2 * size["context"] * lm.d_model
    whole = matmul_weights(lm.bridge.blocks) + n_layers * attention + vocab * lm.d_model
    above = matmul_weights(lm.bridge.blocks[start:]) + (n_layers - start) * attention + vocab * lm.d_model
    rows = []
    with torch.inference_mode():
        eval_seconds(lm, saes[:1], batches[:1], cfg, True)  # warm-up
        for n in size["n_saes"]:
            sync(device)
            sec = eval_seconds(lm, saes[:n], batches, cfg, True)
            sync(device)
            macs = n_real * (whole + (n + 1) * above) + n_tokens * n * 2 * lm.d_model * saes[0][1].d_sae
            rows.append(dict(bench="eval", setting=f"{n} SAE(s), shared prefix, {hook}, batch {size['eval_batch']}",
                             tokens_per_s=n_tokens / sec, flops=2 * macs / sec, peak=fp32_name()))
    return rows


def random_weights_model(config_folder: str, folder: str) -> str:
    """A model folder with `config_folder`'s config.json and tokenizer files and random weights (seed 0)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(config_folder):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(os.path.join(config_folder, name), folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder)).save_pretrained(folder)
    return folder


def fp32_name() -> str:
    from ssae_common.core.runtime import tf32_enabled

    return "tf32" if tf32_enabled() else "fp32"


def table(rows: list[dict], peaks: dict) -> str:
    cells = [COLUMNS] + [(r["bench"], r["setting"], f"{r['tokens_per_s']:.0f}", f"{r['flops'] / 1e12:.3g}",
                          r["peak"], f"{100 * r['share']:.1f}%") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    head = "GEMM peak (TFLOP/s): " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in peaks.items())
    return "\n".join([head, *lines])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="run on the CPU with a tiny model and tiny sizes")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    p.add_argument("--model", default=None, help="model alias, folder or name (default: smollm2; --dry: a tiny "
                                                 "random Llama)")
    p.add_argument("--hook", default=None, help="hook to harvest and evaluate at (default: the toolkit's)")
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a folder with config.json and tokenizer files: time a randomly initialised "
                        "model of that config (same shapes and time; the weights need not be there)")
    args = p.parse_args(argv)
    if args.random_weights and not (args.model and os.path.isfile(os.path.join(args.model, "config.json"))):
        sys.exit("bench-gpu: --random-weights needs --model FOLDER holding a config.json")
    if not args.dry and not torch.cuda.is_available():
        sys.exit("bench-gpu: no CUDA device here (torch.cuda.is_available() is False, torch "
                 f"{torch.__version__}); run it on a GPU machine with a CUDA build of torch, or pass --dry "
                 "for the CPU dry run")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ssae_common.core.runtime import resolve_device
    from ssae_common.data.models import load_model

    device = "cpu" if args.dry else resolve_device(args.device)  # CUDA: the TF32 default is set here
    size = SIZES["dry" if args.dry else "gpu"]
    with tempfile.TemporaryDirectory(prefix="bench-gpu.") as tmp:
        from ssae_common.data.config import DEFAULT_HOOK

        if args.random_weights:
            model = random_weights_model(args.model, os.path.join(tmp, "random-weights"))
        elif args.model:
            model = args.model
        elif args.dry:
            from helpers import make_tiny_model

            model = make_tiny_model(os.path.join(tmp, "tiny"), n_layers=4, d_model=32)
        else:
            model = "smollm2"
        hook = args.hook or ("blocks.1.hook_resid_post" if args.dry and not args.model else DEFAULT_HOOK)
        t0 = time.perf_counter()
        peaks = {"bf16": gemm_peak(device, torch.bfloat16, size["gemm"], size["gemm_seconds"]),
                 "tf32": gemm_peak(device, torch.float32, size["gemm"], size["gemm_seconds"], tf32=True),
                 "fp32": gemm_peak(device, torch.float32, size["gemm"], size["gemm_seconds"], tf32=False)}
        lm = load_model(model, device)
        rows, seconds = [], {"gemm peaks + model load": time.perf_counter() - t0}
        for name, bench in (("fit", lambda: bench_fit(device, size, tmp)),
                            ("harvest", lambda: bench_harvest(device, size, tmp, model, hook, lm)),
                            ("eval", lambda: bench_eval(device, size, tmp, hook, lm))):
            t1 = time.perf_counter()
            done = bench()
            seconds[name] = time.perf_counter() - t1
            for r in done:  # also as they come, so a run stopped at a time limit keeps what it measured
                r["share"] = r["flops"] / peaks[r["peak"]]
                print(f"{name} ({seconds[name]:.0f} s): {r['setting']}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"{100 * r['share']:.1f}% of the {r['peak']} peak", file=sys.stderr, flush=True)
            rows += done
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu (dry run)"
    shown = args.model or ("tiny" if args.dry else model)
    result = {"device": name, "torch": torch.__version__, "dry": args.dry, "model": shown,
              "weights": "random" if args.random_weights or (args.dry and not args.model) else "trained",
              "hook": hook, "tf32": fp32_name() == "tf32", "peaks_flops": peaks, "rows": rows,
              "seconds": seconds}
    print(f"bench-gpu on {name}, torch {torch.__version__}; seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(table(rows, peaks))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
