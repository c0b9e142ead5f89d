"""Benchmark of ssae-eval.  First, its pace on a shared machine: tokens/s of a bare forward pass, of the
clean pass (forward + capture), and of eval with 1, 4 and 13 SAEs, each as a ratio to the bare forward,
alone and beside a competing 2-thread job (a torch matmul loop this script starts and stops), all
interleaved in one run (targets: eval with 1 SAE >= 0.30x the bare forward both times; N SAEs within
10% of clean + (N + 1) suffix reruns, the zero ablation being one).  Then tokens/s of the spliced-in perplexity pass against the bare forward pass
(the reference, measured in the same run on the same batches; target >= 80%); eval tokens/s for 1, 4
and 13 SAEs with the shared prefix (the layers above the hook rerun per SAE) against every pass a whole
forward pass (target for 13 SAEs: <= 0.6x the cost), with where the time goes; and the peak memory of
a whole `ssae-eval --docs` run at two eval sizes (it should not grow with the number of tokens).

    python tests/bench/bench_eval.py [--model smollm2] [--sae DIR] [--tokens 2048] [--sizes 1000,4000]
        [--n-saes 1,4,13] [--scaling-tokens 1024] [--pace-only] [--torch-defaults]

The script runs under the tools' thread settings (core.runtime.configure_threads: threads from the CPUs
this process may use, OpenMP threads that sleep rather than spin); --torch-defaults keeps torch's own.

Without --sae a random top-k SAE (d_sae = 8 x d_model, k = 32) at the default hook is used; timing
does not depend on the weights. Documents: ../shared/data/physics/astro_ph_test.jsonl.gz when present,
else generated text.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
TEST_DOCS = os.path.join(os.path.dirname(ROOT), "shared", "data", "physics", "astro_ph_test.jsonl.gz")


def random_topk_sae(d: int, seed: int = 0):
    """A random top-k SAE (d_sae = 8 x d, k = 32): timing does not depend on the weights."""
    import torch

    from ssae_common.sae.autoencoder import SAE

    g = torch.Generator().manual_seed(seed)
    sae = SAE(d, 8 * d, "topk", 32)
    sae.W_enc.data = torch.randn(d, 8 * d, generator=g) / d ** 0.5
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(8 * d, d, generator=g), dim=1)
    return sae.eval()


def make_sae(folder: str, d: int, model: str, hook: str, seed: int = 0) -> str:
    sae = random_topk_sae(d, seed)
    os.makedirs(folder, exist_ok=True)
    sae.save(folder, model=model, hook=hook)
    return folder


def docs_file(tmp: str) -> str:
    if os.path.exists(TEST_DOCS):
        return TEST_DOCS
    from helpers import sample_docs, write_jsonl

    return write_jsonl(os.path.join(tmp, "docs.jsonl"), sample_docs(400, 200, seed=1))


def throughput(args, tmp: str) -> None:
    import torch

    from ssae_common.data.config import DEFAULT_HOOK
    from ssae_common.data.models import load_model, model_identity
    from ssae_common.core.records import iter_docs
    from ssae_common.sae.autoencoder import SAE
    from ssae_common.eval.splice import DocsEvalConfig, next_token_ce, window_batches

    lm = load_model(args.model, "cpu")
    hook = DEFAULT_HOOK if lm.n_layers > 6 else "blocks.0.hook_resid_post"
    sae_dir = args.sae or make_sae(os.path.join(tmp, "sae"), lm.d_model, model_identity(args.model), hook)
    sae = SAE.load(sae_dir)
    hook = sae.hook or hook
    cfg = DocsEvalConfig(hook=hook, context_size=args.context_size, batch_size=args.batch_size)
    batches = list(window_batches(lm, iter_docs([docs_file(tmp)]), cfg, token_budget=args.tokens))
    n_tokens = sum(int(b.real.sum()) for b in batches)

    def bare(b):  # the same bridge path without any hook: the SAE and splicing are the difference
        logits = lm.bridge.run_with_hooks(b.tokens, fwd_hooks=[])
        return next_token_ce(logits, b.tokens, b.real)

    def spliced(b):
        got = {}

        def grab_and_splice(x, hook):
            x_hat, _ = sae(x[b.splice_pos])
            out = x.clone()
            out[b.splice_pos] = x_hat
            got["n"] = len(x_hat)
            return out

        logits = lm.bridge.run_with_hooks(b.tokens, fwd_hooks=[(hook, grab_and_splice)])
        return next_token_ce(logits, b.tokens, b.real)

    results = {}
    with torch.inference_mode():
        bare(batches[0])  # warm-up
        for r in range(args.rounds):  # interleaved, order alternating, best of rounds: other load evens out
            order = (("bare", bare), ("spliced", spliced))
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                for b in batches:
                    fn(b)
                results.setdefault(name, []).append(time.perf_counter() - t)
        # one batch of the whole per-batch eval step (clean + zero ablation + spliced + metrics), for scale
        from ssae_common.eval.metrics import EvalState, MetricConfig
        from ssae_common.eval.splice import evaluate_docs

        state = EvalState("bench", {"s": (sae.d_in, sae.d_sae)}, MetricConfig(), with_lm=True)
        t = time.perf_counter()
        evaluate_docs(lm, [("s", sae)], iter_docs([docs_file(tmp)]), DocsEvalConfig(
            hook=hook, context_size=args.context_size, batch_size=args.batch_size, max_tokens=args.tokens),
            state, quiet=True)
        full = time.perf_counter() - t
    bare_s, spl_s = min(results["bare"]), min(results["spliced"])
    print(f"model {lm.name} ({lm.n_layers} layers, d_model {lm.d_model}), hook {hook}, SAE d_sae {sae.d_sae} "
          f"{sae.architecture}, {len(batches)} batches of {args.batch_size} x {args.context_size}, "
          f"{n_tokens} tokens (incl. BOS), torch threads {torch.get_num_threads()}")
    print(f"timings: best of {args.rounds} interleaved rounds")
    print(f"{'pass':<34}{'seconds':>10}{'tokens/s':>12}{'vs bare':>10}")
    print(f"{'bare forward + CE (reference)':<34}{bare_s:>10.2f}{n_tokens / bare_s:>12.1f}{1.0:>10.3f}")
    print(f"{'spliced forward + CE':<34}{spl_s:>10.2f}{n_tokens / spl_s:>12.1f}{bare_s / spl_s:>10.3f}"
          f"   target >= 0.80: {'met' if bare_s / spl_s >= 0.8 else 'NOT met'}")
    print(f"{'full eval step (3 passes+metrics)':<34}{full:>10.2f}{n_tokens / full:>12.1f}{bare_s / full:>10.3f}"
          f"   (clean, zero-ablated and spliced passes: ideal 0.333)")
    return sae_dir


def eval_seconds(lm, saes, batches, cfg, shared_prefix: bool) -> float:
    """Seconds of evaluate_docs over the pre-cut batches (all passes, the SAEs and their metrics)."""
    from dataclasses import replace
    from unittest import mock

    from ssae_common.eval import splice
    from ssae_common.eval.metrics import EvalState, MetricConfig

    state = EvalState("bench", {n: (s.d_in, s.d_sae) for n, s in saes}, MetricConfig(), with_lm=True)
    with mock.patch.object(splice, "window_batches", lambda *a, **k: iter(batches)):
        t = time.perf_counter()
        splice.evaluate_docs(lm, saes, [], replace(cfg, shared_prefix=shared_prefix), state, quiet=True)
        return time.perf_counter() - t


def stacked_suffix(suffix, resid, pred, targets, n: int):
    """The suffix run once on n residuals concatenated along the batch (n SAEs' splices in one pass): the
    alternative to n suffix runs that this benchmark measures; the batch-sized keyword tensors (the
    attention mask) are repeated, the broadcast ones (rotary embeddings) kept."""
    import torch

    from ssae_common.data.models import Suffix
    from ssae_common.eval.splice import summed_ce

    b = resid.shape[0]

    def repeat(v):
        return v.repeat(n, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b > 1 else v

    stacked = Suffix(suffix.bridge, suffix.start,
                     [(args, {k: repeat(v) for k, v in kwargs.items()}) for args, kwargs in suffix.calls])
    return summed_ce(stacked(resid.repeat(n, 1, 1), pred.repeat(n, 1)), targets.repeat(n))


def breakdown(lm, sae, batches, hook: str, n: int = 2) -> dict:
    """Seconds per batch (best of n) of each part of the eval step."""
    import torch

    from ssae_common.eval.splice import replaced_pass, scored_positions, summed_ce

    b = batches[0]
    pred, targets = scored_positions(b.real), b.tokens[:, 1:][b.real[:, 1:]]
    logits, acts, suffix = lm.split_run(b.tokens, hook)
    x_splice = acts[b.splice_pos].float()
    x_hat, _ = sae(x_splice)
    resid = acts.clone()
    resid[b.splice_pos] = x_hat
    blocks_out = {}

    def suffix_blocks():
        x = resid
        for block, (args, kwargs) in zip(lm.bridge.blocks[suffix.start:], suffix.calls):
            out = block(x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        blocks_out["x"] = x

    parts = {
        "prefix (layers <= hook, stop_at_layer)": lambda: lm.activations(b.tokens, hook),
        "whole clean pass + capture": lambda: lm.split_run(b.tokens, hook),
        "whole pass, hook replaced (old per SAE)": lambda: replaced_pass(lm, b.tokens, hook, acts, None, b.splice_pos,
                                                                         pred)(x_hat),
        "suffix blocks only": suffix_blocks,
        "final norm + unembed + CE (scored rows)": lambda: summed_ce(
            lm.bridge.unembed(lm.bridge.ln_final(blocks_out["x"][pred])), targets),
        "suffix + unembed + CE (new per SAE)": lambda: summed_ce(
            replaced_pass(lm, b.tokens, hook, acts, suffix, b.splice_pos, pred)(x_hat), targets),
        "SAE encode + decode": lambda: sae(x_splice),
        "suffix + unembed + CE, 2 SAEs as one batch": lambda: stacked_suffix(suffix, resid, pred, targets, 2),
    }
    times = {}
    with torch.no_grad():
        for _ in range(n):
            for name, fn in parts.items():
                t = time.perf_counter()
                fn()
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - t)
    return {"tokens": int(b.real.sum()), "scored": int(pred.sum()), "seconds": times}


def sae_scaling(args, tmp: str) -> None:
    """Eval tokens/s for 1, 4 and 13 SAEs, shared prefix against whole passes, same batches, interleaved."""
    import torch

    from ssae_common.core.records import iter_docs
    from ssae_common.data.config import DEFAULT_HOOK
    from ssae_common.data.models import load_model
    from ssae_common.eval.splice import DocsEvalConfig, window_batches

    lm = load_model(args.model, "cpu")
    hook = DEFAULT_HOOK if lm.n_layers > 6 else "blocks.0.hook_resid_post"
    cfg = DocsEvalConfig(hook=hook, context_size=args.context_size, batch_size=args.batch_size)
    batches = list(window_batches(lm, iter_docs([docs_file(tmp)]), cfg, token_budget=args.scaling_tokens))
    if args.threads:  # one thread: on a busy shared machine, threads waiting for each other swamp the timing
        torch.set_num_threads(args.threads)
    n_tokens = sum(int(b.act_pos.sum()) for b in batches)
    saes = [(f"s{i}", random_topk_sae(lm.d_model, i)) for i in range(max(args.n_saes))]
    times: dict = {}
    with torch.inference_mode():
        eval_seconds(lm, saes[:1], batches[:1], cfg, True)  # warm-up
        for r in range(args.rounds):
            runs = [(n, shared) for n in args.n_saes for shared in (True, False)]
            for n, shared in (runs if r % 2 == 0 else runs[::-1]):
                sec = eval_seconds(lm, saes[:n], batches, cfg, shared)
                times[(n, shared)] = min(times.get((n, shared), float("inf")), sec)
        parts = breakdown(lm, saes[0][1], batches, hook)
    print(f"\nSAEs per eval: {len(batches)} batches, {n_tokens} evaluated tokens, hook {hook} (the rerun starts at "
          f"block {lm.resume_layer(hook)} of {lm.n_layers}), torch threads {torch.get_num_threads()}, best of "
          f"{args.rounds} interleaved rounds")
    print(f"{'SAEs':>5}{'shared s':>10}{'tok/s':>9}{'whole s':>10}{'tok/s':>9}{'ratio':>8}"
          f"{'13 single evals s':>19}{'ratio':>8}")
    single = times[(min(args.n_saes), False)] / min(args.n_saes)  # one single-SAE eval, all passes whole
    for n in args.n_saes:
        new, old = times[(n, True)], times[(n, False)]
        print(f"{n:>5}{new:>10.1f}{n_tokens / new:>9.1f}{old:>10.1f}{n_tokens / old:>9.1f}{new / old:>8.3f}"
              f"{n * single:>19.1f}{new / (n * single):>8.3f}")
    print("ratio: shared-prefix seconds / whole-pass seconds of the same eval (clean + zero ablation + one pass per "
          "SAE, all whole forward passes: ssae-eval before); 13 single evals: n x the 1-SAE whole-pass eval "
          "(each its own clean and zero-ablation passes), derived, not run n times. Target for 13 SAEs: <= 0.6.")
    secs = parts["seconds"]
    print(f"\nwhere the time goes, one batch ({parts['tokens']} tokens, {parts['scored']} scored), best of 2:")
    for name, sec in secs.items():
        print(f"  {name:<44}{sec:>8.3f} s")
    full, suf, sae = (secs["whole pass, hook replaced (old per SAE)"], secs["suffix + unembed + CE (new per SAE)"],
                      secs["SAE encode + decode"])
    stacked = secs["suffix + unembed + CE, 2 SAEs as one batch"] / 2
    print(f"  2 SAEs' splices as one batch: {stacked:.3f} s per SAE, {stacked / suf:.3f} x a suffix run of its own")
    for n in args.n_saes:
        model = (full + (n + 1) * suf + n * sae) / ((n + 2) * full + n * sae)
        print(f"  predicted ratio for {n:>2} SAEs from these parts: (whole + {n + 1} x suffix + {n} x SAE) / "
              f"({n + 2} x whole + {n} x SAE) = {model:.3f}")


def peak_memory(args, sae_dir: str, tmp: str) -> None:
    code = ("import resource, runpy, sys\n"
            "sys.argv = ['ssae-eval'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('ssae_tools.eval', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    rows = []
    for size in args.sizes:
        out = os.path.join(tmp, f"ev{size}")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code, sae_dir, "--docs", docs_file(tmp), "--model", args.model,
                            "--max-tokens", str(size), "--batch-size", str(args.batch_size), "--context-size",
                            str(args.context_size), "--device", "cpu", "-q", "-o", out],
                           capture_output=True, text=True, cwd=tmp)
        if p.returncode:
            sys.exit(f"ssae-eval failed: {p.stderr}")
        rss = int(p.stderr.split("MAXRSS")[1].split()[0]) / 1024
        with open(os.path.join(out, "metrics.json")) as f:
            n = json.load(f)["n_tokens"]
        rows.append((size, n, rss, time.perf_counter() - t))
    print(f"{'--max-tokens':>12}{'tokens':>10}{'peak RSS MiB':>15}{'wall s':>10}")
    for size, n, rss, wall in rows:
        print(f"{size:>12}{n:>10}{rss:>15.0f}{wall:>10.1f}")
    (s0, _, r0, _), (s1, _, r1, _) = rows[0], rows[-1]
    print(f"peak memory ratio {r1 / r0:.3f} for {s1 / s0:.1f}x the tokens (bounded: ~1.0 expected)")


COMPETITOR = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n"
              "while True:\n    a = torch.tanh(a @ a / 20)\n")


def start_competitor():
    """Another 2-thread job with torch's default settings (its OpenMP threads spin between regions)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "SSAE_", "MKL_"))}
    def die_with_parent():  # a benchmark killed mid-run leaves no job spinning behind it
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env, preexec_fn=die_with_parent)
    time.sleep(2.0)  # its start-up (importing torch) is not the competition
    return proc


def pace(args, tmp: str) -> None:
    """tokens/s of the bare forward, the clean pass and eval with 1, 4 and 13 SAEs, alone and beside a
    competing 2-thread job, interleaved (order alternating by round), best of rounds."""
    import torch

    from ssae_common.core.records import iter_docs
    from ssae_common.data.config import DEFAULT_HOOK
    from ssae_common.data.models import load_model
    from ssae_common.eval.splice import DocsEvalConfig, next_token_ce, window_batches

    lm = load_model(args.model, "cpu")
    hook = DEFAULT_HOOK if lm.n_layers > 6 else "blocks.0.hook_resid_post"
    cfg = DocsEvalConfig(hook=hook, context_size=args.context_size, batch_size=args.batch_size)
    batches = list(window_batches(lm, iter_docs([docs_file(tmp)]), cfg, token_budget=args.pace_tokens))
    n_tokens = sum(int(b.real.sum()) for b in batches)
    saes = [(f"s{i}", random_topk_sae(lm.d_model, i)) for i in range(max(args.n_saes))]

    def bare():
        for b in batches:
            next_token_ce(lm.bridge.run_with_hooks(b.tokens, fwd_hooks=[]), b.tokens, b.real)

    def clean():
        for b in batches:
            logits, _, _ = lm.split_run(b.tokens, hook)
            next_token_ce(logits, b.tokens, b.real)

    passes = [("bare forward + CE", bare), ("clean pass (forward + capture)", clean)]
    passes += [(f"eval, {n} SAE{'s' if n > 1 else ''}", lambda n=n: eval_seconds(lm, saes[:n], batches, cfg, True))
               for n in args.n_saes]
    times: dict = {}
    loads: dict = {}
    with torch.inference_mode():
        eval_seconds(lm, saes[:1], batches, cfg, True)  # warm-up (and the suffix check)
        for phase in ("alone", "beside"):
            competitor = start_competitor() if phase == "beside" else None
            loads[phase] = [os.getloadavg()[0]]
            try:
                for r in range(args.rounds):
                    for name, fn in (passes if r % 2 == 0 else passes[::-1]):
                        t = time.perf_counter()
                        fn()
                        key, sec = (phase, name), time.perf_counter() - t
                        times[key] = min(times.get(key, float("inf")), sec)
                        print(f"  {phase}, round {r + 1}: {name} {sec:.2f} s", file=sys.stderr, flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            loads[phase].append(os.getloadavg()[0])
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"eval pace: {lm.name}, hook {hook}, {len(batches)} batch(es) of {args.batch_size} x {args.context_size}, "
          f"{n_tokens} tokens; torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY {policy}; best of "
          f"{args.rounds} interleaved rounds; 1-min load {loads['alone'][0]:.1f}-{loads['alone'][1]:.1f} alone, "
          f"{loads['beside'][0]:.1f}-{loads['beside'][1]:.1f} beside the competitor")
    print(f"{'pass':<34}{'alone tok/s':>12}{'x bare':>8}{'beside tok/s':>14}{'x bare':>8}{'slowdown':>10}")
    for name, _ in passes:
        a, b = times[("alone", name)], times[("beside", name)]
        ra, rb = times[("alone", passes[0][0])] / a, times[("beside", passes[0][0])] / b
        print(f"{name:<34}{n_tokens / a:>12.1f}{ra:>8.3f}{n_tokens / b:>14.1f}{rb:>8.3f}{b / a:>10.2f}")
    for phase in ("alone", "beside"):
        bare_s, clean_s = times[(phase, passes[0][0])], times[(phase, passes[1][0])]
        one = times[(phase, passes[2][0])]
        rerun = (one - clean_s) / 2  # eval with 1 SAE = clean + zero-ablation rerun + one SAE's rerun
        ratio = bare_s / one
        fits = []
        for n in args.n_saes[1:]:
            predicted = clean_s + (n + 1) * rerun
            got = times[(phase, f"eval, {n} SAEs")]
            fits.append(f"{n} SAEs {got / predicted:.3f}")
        print(f"{phase}: eval with 1 SAE {ratio:.3f}x the bare forward (target >= 0.30: "
              f"{'met' if ratio >= 0.30 else 'NOT met'}); N SAEs / (clean + (N + 1) reruns), target within "
              f"0.90-1.10: {', '.join(fits)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sae", default=None)
    p.add_argument("--tokens", type=int, default=2048, help="tokens for the throughput comparison")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 4000])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true", help="skip the bare-against-spliced comparison")
    p.add_argument("--n-saes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 13])
    p.add_argument("--scaling-tokens", type=int, default=1024, help="evaluated tokens for the SAE-count comparison")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the SAE-count comparison (0: torch's)")
    p.add_argument("--pace-tokens", type=int, default=1024, help="tokens for the pace comparison (one batch: 1024)")
    p.add_argument("--pace-only", action="store_true", help="only the pace comparison (alone and beside a job)")
    p.add_argument("--skip-pace", action="store_true")
    p.add_argument("--torch-defaults", action="store_true",
                   help="keep torch's thread count and OpenMP wait policy instead of the tools' settings")
    args = p.parse_args()
    if not args.torch_defaults:
        from ssae_common.core.runtime import configure_threads

        configure_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-eval.") as tmp:
        if not args.skip_pace:
            pace(args, tmp)
            if args.pace_only:
                return
        sae_dir = None if args.skip_throughput else throughput(args, tmp)
        sae_scaling(args, tmp)
        if sae_dir and not args.skip_memory:  # the SAE of the throughput part
            peak_memory(args, sae_dir, tmp)


if __name__ == "__main__":
    main()
