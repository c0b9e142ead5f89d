"""How each cost grows (make -C shell bench-scale): wall time and peak resident memory of whole tool runs
at several sizes, and the exponent b of a least-squares fit time ~ size^b per curve:

- retrieval, BM25 and dense, against the number of corpus documents (a synthetic corpus recombined from
  the pool: each document a run of sentences drawn from random pool documents, seeded);
- ssae-harvest against the number of tokens;
- ssae-fit against the number of training tokens, and against d_sae;
- ssae-eval against the number of SAEs.

    python tests/bench/bench_scale.py [--sizes small|tiny|full] [--out scale.json]

SIZES (or --sizes) picks the size sets below: `tiny` runs the whole bench in seconds on a random
two-layer model (what the test runs), `small` on the bundled SmolLM2 in minutes on 2 CPU cores, `full`
the sizes of docs/scale.md.  Every size is a fresh process, so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))
from common import BIN, run_peak_rss, shared  # noqa: E402

SIZES = {
    "tiny": {"bm25_docs": [200, 400, 800], "dense_docs": [50, 100, 200], "harvest_tokens": [256, 512, 1024],
             "fit_tokens": [2048, 4096, 8192], "d_sae": [32, 64, 128], "eval_saes": [1, 2, 4], "eval_tokens": 128},
    "small": {"bm25_docs": [10_000, 30_000, 100_000], "dense_docs": [500, 1000, 2000],
              "harvest_tokens": [2048, 4096, 8192], "fit_tokens": [50_000, 100_000, 200_000],
              "d_sae": [1152, 2304, 4608], "eval_saes": [1, 2, 4], "eval_tokens": 512},
    "full": {"bm25_docs": [10_000, 100_000, 1_000_000], "dense_docs": [10_000, 100_000, 1_000_000],
             "harvest_tokens": [10_000, 100_000, 1_000_000], "fit_tokens": [1_000_000, 4_000_000, 16_000_000],
             "d_sae": [2304, 4608, 9216], "eval_saes": [1, 4, 13], "eval_tokens": 4096},
}
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def pool_sentences(n_docs: int, seed: int = 0) -> list[str]:
    pool = shared("general", "pool.jsonl.gz")
    if pool is None:
        from helpers import sample_docs

        return [s for d in sample_docs(200, 60, seed=seed) for s in SENTENCE.split(d["text"])]
    out = []
    with gzip.open(pool, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n_docs:
                break
            out.extend(s for s in SENTENCE.split(json.loads(line)["text"]) if len(s) > 20)
    return out


def synthetic_corpus(path: str, n: int, sentences: list[str], seed: int = 0) -> str:
    """n documents of 3-12 sentences drawn from `sentences` (seeded), streamed to a .jsonl.gz."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"id": f"syn{i}", "text": text}) + "\n")
    return path


def exponent(xs, ys) -> float:
    """b of the least-squares fit log y = a + b log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def tool(name: str) -> str:
    return os.path.join(BIN, f"ssae-{name}")


PARTS = ("bm25", "dense", "harvest", "fit", "eval")


def curves(sizes: dict, model: str, hook: list[str], work: str, env: dict, parts=PARTS) -> dict:
    """{curve: [(size, seconds, peak MiB), ...]} of the `parts` asked for (eval needs fit)."""
    out: dict = {}
    sentences = pool_sentences(2000)
    seeds = shared("physics", "astro_ph_seeds.jsonl") or synthetic_corpus(
        os.path.join(work, "seeds.jsonl.gz"), 5, sentences, seed=99)
    run = lambda cmd: run_peak_rss(cmd, env=env, cwd=work)  # noqa: E731
    for method, key in (("bm25", "bm25_docs"), ("dense", "dense_docs")):
        if method not in parts:
            continue
        rows = out.setdefault(f"retrieve {method} vs documents", [])
        for n in sizes[key]:
            corpus = os.path.join(work, f"corpus-{n}.jsonl.gz")
            if not os.path.exists(corpus):
                synthetic_corpus(corpus, n, sentences)
            rows.append((n, *run([tool("retrieve"), seeds, "--corpus", corpus, "--method", method, "--top-k", "100",
                                  "--dense-max-length", "128", "-q", "--force", "-o", os.path.join(work, "r.jsonl")])))
    docs = synthetic_corpus(os.path.join(work, "docs.jsonl.gz"), 4000, sentences, seed=1)
    for n in sizes["harvest_tokens"] if "harvest" in parts else ():
        out.setdefault("harvest vs tokens", []).append((n, *run([
            tool("harvest"), docs, "--model", model, *hook, "--max-tokens", str(n), "-q", "--force",
            "-o", os.path.join(work, f"h{n}.h5")])))
    if "fit" not in parts:
        return out
    acts = os.path.join(work, "acts.h5")
    run([tool("harvest"), docs, "--model", model, *hook, "--max-tokens", str(max(sizes["fit_tokens"]) // 4), "-q", "--force",
         "-o", acts])
    fit = [tool("fit"), acts, "--architecture", "topk", "--k", "8", "--val-tokens", "0", "-q", "--force"]
    rows = out.setdefault("fit vs training tokens", [])
    for n in sizes["fit_tokens"]:
        rows.append((n, *run(fit + ["--d-sae", str(sizes["d_sae"][0]), "--train-tokens", str(n),
                                    "-o", os.path.join(work, "f")])))
    rows = out.setdefault("fit vs d_sae", [])
    for d in sizes["d_sae"]:
        rows.append((d, *run(fit + ["--d-sae", str(d), "--train-tokens", str(sizes["fit_tokens"][0]),
                                    "-o", os.path.join(work, f"sae{d}")])))
    if "eval" not in parts:
        return out
    saes = [os.path.join(work, f"sae{sizes['d_sae'][0]}")]
    for i in range(1, max(sizes["eval_saes"])):  # more SAEs of the same shape, other seeds
        folder = os.path.join(work, f"sae-s{i}")
        run(fit + ["--d-sae", str(sizes["d_sae"][0]), "--train-tokens", str(sizes["fit_tokens"][0]),
                   "--seed", str(i), "-o", folder])
        saes.append(folder)
    rows = out.setdefault("eval vs SAEs", [])
    for n in sizes["eval_saes"]:
        rows.append((n, *run([tool("eval"), *saes[:n], "--docs", docs, "--model", model, "--max-tokens",
                              str(sizes["eval_tokens"]), "-q", "--force", "-o", os.path.join(work, f"e{n}")])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=os.environ.get("SIZES", "small"), choices=sorted(SIZES))
    ap.add_argument("--model", default=None, help="default: smollm2, or a random 2-layer model for tiny")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"curves to measure, of {','.join(PARTS)}")
    ap.add_argument("--out", default=None, help="also write the rows and exponents here as JSON")
    args = ap.parse_args()
    sizes = SIZES[args.sizes]
    with tempfile.TemporaryDirectory(prefix="bench-scale.") as work:
        model = args.model
        if model is None and args.sizes == "tiny":
            from helpers import make_tiny_model

            model = make_tiny_model(os.path.join(work, "model"), n_layers=2, d_model=16)
        model = model or "smollm2"
        env = {**os.environ, "SSAE_WORKDIR": os.path.join(work, "ssae-work")}
        hook = ["--hook", "blocks.1.hook_resid_post"] if args.sizes == "tiny" and args.model is None else []
        rows = curves(sizes, model, hook, work, env, args.parts.split(","))
    load = os.getloadavg()[0]
    print(f"bench-scale ({args.sizes}), model {model if args.sizes != 'tiny' else 'random 2-layer'}, "
          f"1-min load at the end {load:.1f}")
    print(f"{'curve':<30}{'size':>10}{'wall s':>10}{'peak MiB':>10}")
    result = {"sizes": args.sizes, "load": load, "curves": {}}
    for curve, points in rows.items():
        for size, sec, mib in points:
            print(f"{curve:<30}{size:>10}{sec:>10.1f}{mib:>10.0f}")
        xs, ts, ms = zip(*points)
        b_time, b_mem = exponent(xs, ts), exponent(xs, ms)
        print(f"{'':<30}{'exponent: time ~ size^':>30}{b_time:.2f}, peak RSS ~ size^{b_mem:.2f}")
        result["curves"][curve] = {"points": [list(p) for p in points], "time_exponent": b_time,
                                   "memory_exponent": b_mem}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
