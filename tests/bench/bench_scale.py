"""How each cost grows (make -C shell bench-scale): wall time and peak resident memory of whole tool runs
at three sizes each, and the exponent b of a least-squares fit time ~ size^b (and RSS ~ size^b) per curve:

- retrieval, BM25 and dense, against the number of corpus documents (a synthetic corpus recombined from
  the pool: each document a run of sentences drawn from random pool documents, seeded); every BM25 run
  works under the memory cap `retrieve_cap_mib`, building its corpus store and index in that run;
- ssae-harvest against the number of tokens;
- ssae-fit against the number of training tokens, and against d_sae;
- ssae-eval against the number of SAEs;
- capped: ssae-fit, one pass over an activation file at least 4x larger than its memory cap (the rows of
  the largest harvest repeated into a valid file, as float32), and the largest BM25 retrieval, under a
  cap: a child cgroup (v2, else v1) with swap off, else RLIMIT_AS (common.MemoryCap).

    python tests/bench/bench_scale.py [--sizes small|tiny|full] [--parts bm25,...] [--out scale.json]

SIZES (or --sizes) picks the size sets below: `tiny` runs the whole bench in minutes on a random
two-layer model (what the test runs), `small` on the bundled SmolLM2 in about half an hour on 2 CPU
cores, `full` the sizes of a GPU node.  Every size is a fresh process, so its peak RSS is its own.  The
tables go to stdout as markdown, the same figures to --out as JSON.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import re
import sys
import tempfile

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))
from common import BIN, run_capped, run_peak_rss, shared  # noqa: E402

# Each set: three sizes per curve; `seeds` retrieval queries; `retrieve_cap_mib`, the memory cap every BM25
# run works under (its largest is the capped retrieval); `fit_cap_mib` and `capped_store_mib`, the cap of
# the capped fit and the size of the activation file it reads (at least 4x the cap, except at tiny, which
# checks the mechanics only); `project`: curves extrapolated to a size this machine does not reach.
SIZES = {
    "tiny": {"bm25_docs": [200, 400, 800], "dense_docs": [50, 100, 200], "harvest_tokens": [256, 512, 1024],
             "fit_tokens": [2048, 4096, 8192], "d_sae": [32, 64, 128], "eval_saes": [1, 2, 4], "eval_tokens": 128,
             "seeds": 5, "retrieve_cap_mib": 2048, "fit_cap_mib": 2048, "capped_store_mib": 16, "project": {}},
    "small": {"bm25_docs": [10_000, 100_000, 1_000_000], "dense_docs": [1000, 4000, 16_000],
              "harvest_tokens": [32_768, 131_072, 524_288], "fit_tokens": [300_000, 1_200_000, 3_600_000],
              "d_sae": [2304, 4608, 9216], "eval_saes": [1, 4, 13], "eval_tokens": 2048, "seeds": 20,
              "retrieve_cap_mib": 1024, "fit_cap_mib": 1024, "capped_store_mib": 4096,
              "project": {"retrieve dense vs documents": 1_000_000}},
    "full": {"bm25_docs": [10_000, 100_000, 1_000_000], "dense_docs": [10_000, 100_000, 1_000_000],
             "harvest_tokens": [10_000, 100_000, 1_000_000], "fit_tokens": [1_000_000, 4_000_000, 16_000_000],
             "d_sae": [2304, 4608, 9216], "eval_saes": [1, 4, 13], "eval_tokens": 4096, "seeds": 200,
             "retrieve_cap_mib": 8192, "fit_cap_mib": 4096, "capped_store_mib": 16384, "project": {}},
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


PARTS = ("bm25", "dense", "harvest", "fit", "eval", "capped")


def replicated_store(source: str, path: str, min_bytes: int) -> str:
    """An activation file of at least `min_bytes`: the rows and documents of `source` repeated (each copy's
    document ids suffixed #copyN), stored as float32 so that fewer rows reach the size. A valid
    ssae.activations/1 file, made in seconds instead of a long harvest."""
    from ssae_common.data.activations import ActivationStore, ActivationWriter

    with ActivationStore(source) as store:
        rows = store.rows(0, store.n_tokens)
        token_ids, doc_index, position = store.token_ids(), store.doc_index(), store.position()
        ids = [store.doc_id(i) for i in range(store.n_docs)]
        texts = [store.doc_text(i) for i in range(store.n_docs)] if store.has_text else [""] * store.n_docs
        n_docs, d = store.n_docs, store.d_model
        attrs = {k: v for k, v in store.attrs.items()
                 if k not in ("schema", "dtype", "d_model", "n_tokens", "n_docs", "complete", "resume")}
    copies = -(-min_bytes // rows.nbytes)
    attrs["replicated"] = f"{copies} copies of the rows of {os.path.basename(source)}"
    writer = ActivationWriter(path, d_model=d, dtype="float32", attrs=attrs, resume=False)
    for c in range(copies):
        writer.add_docs([f"{i}#copy{c}" for i in ids], texts, list(range(c * n_docs, (c + 1) * n_docs)))
        writer.add_rows(rows, token_ids, doc_index + c * n_docs, position)
        writer.checkpoint((c + 1) * n_docs, (c + 1) * n_docs, 0)
    writer.finish()
    return path


class Bench:
    """The tool runs of one bench: fresh processes (each peak RSS its own) in one work folder."""

    def __init__(self, sizes: dict, model: str, hook: list[str], work: str, env: dict):
        self.sizes, self.model, self.hook, self.work, self.env = sizes, model, hook, work, env
        self.sentences = pool_sentences(2000)
        self.corpus_sentences = pool_sentences(20000)  # a wider vocabulary for the retrieval corpora
        self.docs = synthetic_corpus(self.path("docs.jsonl.gz"), 4000, self.sentences, seed=1)
        self.seeds = self.path("seeds.jsonl")
        source = shared("physics", "astro_ph_seeds.jsonl")
        if source:
            with open(source) as f, open(self.seeds, "w") as out:
                out.writelines(line for _, line in zip(range(sizes["seeds"]), f))
        else:
            self.seeds = synthetic_corpus(self.path("seeds.jsonl.gz"), sizes["seeds"], self.sentences, seed=99)
        self.fit_cmd = [tool("fit"), "--architecture", "topk", "--k", "8", "--val-tokens", "0", "-q", "--force"]

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def run(self, cmd: list[str], env: dict | None = None) -> tuple[float, float]:
        return run_peak_rss(cmd, env=env or self.env, cwd=self.work)

    def corpus(self, n: int) -> str:
        path = self.path(f"corpus-{n}.jsonl.gz")
        return path if os.path.exists(path) else synthetic_corpus(path, n, self.corpus_sentences)

    def retrieve_capped(self, n: int) -> dict:
        """BM25 retrieval from an n-document corpus under the retrieval cap, its corpus store and index built
        in that run (a fresh work folder)."""
        env = {**self.env, "SSAE_WORKDIR": self.path(f"ssae-work-bm25-{n}")}
        result = run_capped([tool("retrieve"), self.seeds, "--corpus", self.corpus(n), "--method", "bm25",
                             "--top-k", "100", "-q", "--force", "-o", self.path("r.jsonl")],
                            self.sizes["retrieve_cap_mib"] << 20, env=env, cwd=self.work)
        (stored,) = glob.glob(os.path.join(env["SSAE_WORKDIR"], "index", "corpus-*", "docs.jsonl"))
        (index,) = glob.glob(os.path.join(env["SSAE_WORKDIR"], "index", "bm25-*"))
        result["input_mib"] = os.path.getsize(stored) / 2**20  # the corpus as the tool stores it, uncompressed
        result["index_mib"] = sum(os.path.getsize(os.path.join(index, f)) for f in os.listdir(index)) / 2**20
        if result["returncode"] != 0:
            raise SystemExit(f"ssae-retrieve on {n} documents under a {self.sizes['retrieve_cap_mib']} MiB cap "
                             f"failed ({result['returncode']}): {result['stderr_tail']}")
        return result

    def harvest(self, n: int) -> str:
        return self.path(f"h{n}.h5")

    def acts(self) -> str:
        """The activation file the fits read: the largest harvest's (harvested here if that part did not run)."""
        path = self.harvest(self.sizes["harvest_tokens"][-1])
        if not os.path.exists(path):
            self.run([tool("harvest"), self.docs, "--model", self.model, *self.hook, "--max-tokens",
                      str(self.sizes["harvest_tokens"][-1]), "-q", "--force", "-o", path])
        return path

    def fit(self, out: str, d_sae: int, tokens: int, *extra: str, acts: str | None = None) -> list[str]:
        return self.fit_cmd + [acts or self.acts(), "--d-sae", str(d_sae), "--train-tokens", str(tokens),
                               "-o", self.path(out), *extra]


def curves(sizes: dict, model: str, hook: list[str], work: str, env: dict, parts=PARTS) -> tuple[dict, list]:
    """({curve: [(size, seconds, peak MiB), ...]}, [capped run, ...]) of the `parts` asked for."""
    b = Bench(sizes, model, hook, work, env)
    out: dict = {}
    capped: list = []
    if "bm25" in parts:
        rows = out.setdefault("retrieve bm25 vs documents", [])
        for n in sizes["bm25_docs"]:
            result = b.retrieve_capped(n)
            rows.append((n, result["seconds"], result["peak_rss_mib"]))
    elif "capped" in parts:
        n, result = sizes["bm25_docs"][-1], b.retrieve_capped(sizes["bm25_docs"][-1])
    if "bm25" in parts or "capped" in parts:
        capped.append({"run": f"ssae-retrieve --method bm25, {n:,} documents (index {result['index_mib']:.0f} MiB)",
                       **result})
    if "dense" in parts:
        rows = out.setdefault("retrieve dense vs documents", [])
        for n in sizes["dense_docs"]:
            rows.append((n, *b.run([tool("retrieve"), b.seeds, "--corpus", b.corpus(n), "--method", "dense",
                                    "--top-k", "100", "--dense-max-length", "128", "-q", "--force",
                                    "-o", b.path("r.jsonl")])))
    for n in sizes["harvest_tokens"] if "harvest" in parts else ():
        out.setdefault("harvest vs tokens", []).append((n, *b.run([
            tool("harvest"), b.docs, "--model", model, *hook, "--max-tokens", str(n), "-q", "--force",
            "-o", b.harvest(n)])))
    d0, t0 = sizes["d_sae"][0], sizes["fit_tokens"][0]
    if "fit" in parts:
        rows = out.setdefault("fit vs training tokens", [])
        for n in sizes["fit_tokens"]:
            rows.append((n, *b.run(b.fit("f", d0, n))))
        rows = out.setdefault("fit vs d_sae", [])
        for d in sizes["d_sae"]:
            rows.append((d, *b.run(b.fit(f"sae{d}", d, t0))))
    elif "eval" in parts:
        b.run(b.fit(f"sae{d0}", d0, t0))
    if "eval" in parts:
        saes = [b.path(f"sae{d0}")]
        more = max(sizes["eval_saes"]) - 1
        if more:  # more SAEs of the same shape, other seeds, trained in one run
            seeds = [str(i) for i in range(1, more + 1)]
            b.run(b.fit("saes", d0, t0, "--seed", ",".join(seeds)))
            saes += [os.path.join(b.path("saes"), f"seed{s}") for s in seeds]
            missing = [p for p in saes if not os.path.exists(os.path.join(p, "cfg.json"))]
            if missing:
                raise SystemExit(f"ssae-fit --seed {','.join(seeds)} left no SAE at {missing[0]}")
        rows = out.setdefault("eval vs SAEs", [])
        for n in sizes["eval_saes"]:
            rows.append((n, *b.run([tool("eval"), *saes[:n], "--docs", b.docs, "--model", model, "--max-tokens",
                                    str(sizes["eval_tokens"]), "-q", "--force", "-o", b.path(f"e{n}")])))
    if "capped" in parts:
        big = replicated_store(b.acts(), b.path("acts-big.h5"), sizes["capped_store_mib"] << 20)
        with h5py.File(big, "r") as f:
            rows_big = int(f.attrs["n_tokens"])
        result = run_capped(b.fit("capped-fit", d0, rows_big, acts=big), sizes["fit_cap_mib"] << 20,
                            env=env, cwd=work)
        result["input_mib"] = os.path.getsize(big) / 2**20
        if result["returncode"] != 0:
            raise SystemExit(f"ssae-fit on {big} under a {sizes['fit_cap_mib']} MiB cap failed "
                             f"({result['returncode']}): {result['stderr_tail']}")
        capped.append({"run": f"ssae-fit, one pass over {rows_big:,} rows", **result})
    return out, capped


def load_line() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def report(args, model_label: str, rows: dict, capped: list, loads: tuple[str, str]) -> dict:
    """Print the markdown tables; return the JSON document."""
    sizes = SIZES[args.sizes]
    result = {"sizes": args.sizes, "model": model_label, "load_start": loads[0], "load_end": loads[1],
              "cpus": os.cpu_count(), "curves": {}, "capped": [], "projections": []}
    print(f"bench-scale ({args.sizes}), model {model_label}, {os.cpu_count()} CPUs, "
          f"load average (1, 5, 15 min) at the start {loads[0]}, at the end {loads[1]}\n")
    print("| curve | size | wall s | peak RSS MiB |\n|---|---:|---:|---:|")
    for curve, points in rows.items():
        for size, sec, mib in points:
            print(f"| {curve} | {size:,} | {sec:.1f} | {mib:.0f} |")
    print("\n| curve | time ~ size^b | peak RSS ~ size^b |\n|---|---:|---:|")
    for curve, points in rows.items():
        xs, ts, ms = zip(*points)
        b_time, b_mem = exponent(xs, ts), exponent(xs, ms)
        print(f"| {curve} | {b_time:.2f} | {b_mem:.2f} |")
        result["curves"][curve] = {"points": [list(p) for p in points], "time_exponent": b_time,
                                   "memory_exponent": b_mem}
    for curve, target in sizes["project"].items():
        if curve not in result["curves"]:
            continue
        (x1, t1, _), (x2, t2, _) = result["curves"][curve]["points"][-2:]
        by_exponent = t2 * (target / x2) ** result["curves"][curve]["time_exponent"]
        by_rate = t2 + (target - x2) * (t2 - t1) / (x2 - x1)
        result["projections"].append({"curve": curve, "size": target, "seconds_from_exponent": by_exponent,
                                      "seconds_from_marginal_rate": by_rate})
        print(f"\nProjection, not measured: {curve} at {target:,}: {by_exponent:.3g} s from the exponent, "
              f"{by_rate:.3g} s from the marginal rate between the two largest sizes (the exponent of sizes "
              f"where start-up dominates understates the growth)")
    if capped:
        print("\n| capped run | mechanism | cap MiB | input MiB | input / cap | wall s | peak RSS MiB | "
              "cgroup peak MiB | exit |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in capped:
        cg = "-" if c["cgroup_peak_mib"] is None else f"{c['cgroup_peak_mib']:.0f}"
        print(f"| {c['run']} | {c['mechanism']} | {c['limit_mib']:.0f} | {c['input_mib']:.0f} | "
              f"{c['input_mib'] / c['limit_mib']:.2f} | {c['seconds']:.1f} | {c['peak_rss_mib']:.0f} | {cg} | "
              f"{c['returncode']} |")
        result["capped"].append({k: v for k, v in c.items() if k != "stderr_tail"})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=os.environ.get("SIZES", "small"), choices=sorted(SIZES))
    ap.add_argument("--model", default=None, help="default: smollm2, or a random 2-layer model for tiny")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, of {','.join(PARTS)}")
    ap.add_argument("--out", default=None, help="also write the rows, exponents and capped runs here as JSON")
    args = ap.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts {','.join(unknown)}: expected some of {','.join(PARTS)}")
    loads = [load_line()]
    with tempfile.TemporaryDirectory(prefix="bench-scale.") as work:
        model = args.model
        if model is None and args.sizes == "tiny":
            from helpers import make_tiny_model

            model = make_tiny_model(os.path.join(work, "model"), n_layers=2, d_model=16)
        model = model or "smollm2"
        env = {**os.environ, "SSAE_WORKDIR": os.path.join(work, "ssae-work")}
        hook = ["--hook", "blocks.1.hook_resid_post"] if args.sizes == "tiny" and args.model is None else []
        rows, capped = curves(SIZES[args.sizes], model, hook, work, env, parts)
    loads.append(load_line())
    label = model if args.sizes != "tiny" or args.model else "random 2-layer"
    result = report(args, label, rows, capped, tuple(loads))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
