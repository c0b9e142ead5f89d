"""Benchmark of ssae-retrieve (make -C shell bench-retrieve).

On ../shared/data/general/pool.jsonl.gz with the 200 astro-ph seeds:
- BM25 queries/s, bm25s vs rank-bm25 in the same run (rank-bm25 on the first --ref-queries seeds, it
  takes seconds a query), and whether their top-100 lists are identical;
- dense encoding documents/s (fresh encoding of --encode-sample pool documents) and per-query latency
  (query encoding + exact blocked search over all pool embeddings);
- TracIn documents/s (LM activations at the SAE's hook + factorised scores);
- quality: the share of arXiv documents in each method's top 1,000 (running the real ssae-retrieve).
  Dense retrieval needs every pool document embedded; where that is too slow (--quality-every N), all
  methods are also compared on every N-th pool document with the top 1000/N, and the table says so.

Caches live in $SSAE_WORKDIR (default ./ssae-work), so a second run reuses indexes and embeddings.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
BIN = os.path.dirname(sys.executable)
ARXIV = "arxiv-astro-ph"


def subset(pool: str, every: int, folder: str) -> str:
    """Every `every`-th pool document (deterministic), as a file whose hash keys the caches."""
    path = os.path.join(folder, f"pool-every{every}.jsonl")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with gzip.open(pool, "rt", encoding="utf-8") as f, open(path + ".tmp", "w", encoding="utf-8") as out:
            for i, line in enumerate(f):
                if i % every == 0:
                    out.write(line)
        os.replace(path + ".tmp", path)
    return path


def retrieve(args: list[str], log: list[str]) -> tuple[list[dict], float]:
    script = os.path.join(BIN, "ssae-retrieve")
    launcher = [script] if os.path.exists(script) else [sys.executable, "-m", "ssae_tools.retrieve"]
    cmd = [*launcher, *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    log.append(f"$ ssae-retrieve {' '.join(cmd[len(launcher):])}  [{took:.0f} s]\n" + "".join(
        "    " + line + "\n" for line in res.stderr.splitlines() if "ssae-retrieve:" in line))
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()], took


def arxiv_share(records: list[dict]) -> str:
    n = sum(r.get("source") == ARXIV for r in records)
    return f"{n / max(len(records), 1):.1%} ({n}/{len(records)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default=os.path.join(DATA, "general", "pool.jsonl.gz"))
    ap.add_argument("--seeds", default=os.path.join(DATA, "physics", "astro_ph_seeds.jsonl"))
    ap.add_argument("--ref-queries", type=int, default=20, help="seeds run through rank-bm25 (slow)")
    ap.add_argument("--encode-sample", type=int, default=512, help="pool documents encoded to time dense encoding")
    ap.add_argument("--quality-every", type=int, default=20,
                    help="also compare all methods on every N-th pool document (0: full pool only)")
    ap.add_argument("--dense-full", action="store_true", help="embed the whole pool for dense quality (hours on 2 CPU cores)")
    ap.add_argument("--sae", action="append", default=[], help="SAE folder for TracIn (default: skip TracIn quality)")
    ap.add_argument("--tracin-docs", type=int, default=64, help="candidates timed for TracIn documents/s")
    ap.add_argument("--tracin-full", action="store_true", help="also rerank the full pool's bm25 top-1000 (3,000 LM passes)")
    ap.add_argument("--top", type=int, default=1000)
    ap.add_argument("--sections", default="bm25,dense,tracin,quality",
                    help="comma list of the parts to run (e.g. bm25,dense now and tracin,quality later)")
    opts = ap.parse_args()
    if not os.path.exists(opts.pool):
        print(f"skipped: {opts.pool} is not present", file=sys.stderr)
        return
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench: %(message)s")
    from ssae_common.retrieval import engines as R

    work = os.environ.setdefault("SSAE_WORKDIR", os.path.join(ROOT, "ssae-work"))
    seeds = [json.loads(line) for line in open(opts.seeds, encoding="utf-8") if line.strip()]
    queries = [s["text"] for s in seeds]
    rows: list[tuple[str, str]] = []
    cpu = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start (a shared machine)"

    # ------------------------------------------------------------------ BM25: bm25s vs rank-bm25
    t0 = time.perf_counter()
    store = R.CorpusStore.open_or_build([opts.pool])
    rows.append(("corpus store (read once, then reused)", f"{time.perf_counter() - t0:.1f} s, {len(store)} docs"))
    sections = set(opts.sections.split(","))
    params = R.BM25Params()
    t0 = time.perf_counter()
    fast = R.BM25Index(store, params, "bm25s")
    rows.append(("bm25s index " + ("build" if fast.built else "load (cached)"), f"{time.perf_counter() - t0:.1f} s"))
    t0 = time.perf_counter()
    fast_rank = fast.rank(queries if "bm25" in sections else queries[:1], 100)
    bm25s_qps = len(fast_rank) / (time.perf_counter() - t0)
    if "bm25" in sections:
        bm25_reference(R, store, params, queries, fast_rank, bm25s_qps, opts, rows)
    if "dense" in sections:
        dense_speed(store, queries, opts, rows)
    if "tracin" in sections and opts.sae:
        tracin_speed(store, queries, fast_rank, opts, rows)
    if "quality" in sections:
        quality(store, opts, work, rows)
    report(rows, cpu, work)


def bm25_reference(R, store, params, queries, fast_rank, bm25s_qps, opts, rows):
    t0 = time.perf_counter()
    ref = R.BM25Index(store, params, "rank-bm25")
    rows.append(("rank-bm25 index build (in memory)", f"{time.perf_counter() - t0:.1f} s"))
    n_ref = min(opts.ref_queries, len(queries))
    t0 = time.perf_counter()
    ref_rank = ref.rank(queries[:n_ref], 100)
    ref_qps = n_ref / (time.perf_counter() - t0)
    del ref
    same = sum(a.positions.tolist() == b.positions.tolist() for a, b in zip(fast_rank, ref_rank))
    rows.append(("bm25s queries/s (200 seeds, top-100 each)", f"{bm25s_qps:.1f}"))
    rows.append((f"rank-bm25 queries/s (first {n_ref} seeds)", f"{ref_qps:.3f}"))
    rows.append(("speed-up bm25s / rank-bm25", f"{bm25s_qps / ref_qps:.0f}x"))
    rows.append(("identical top-100 (bm25s vs rank-bm25)", f"{same}/{n_ref} queries"))


def dense_speed(store, queries, opts, rows):
    from ssae_common.retrieval import dense as D
    from ssae_common.retrieval.config import DEFAULT_DENSE_MODEL

    sample = [t for _, t in zip(range(opts.encode_sample), store.iter_texts())]
    encoder = D.load_encoder(DEFAULT_DENSE_MODEL, "cpu")
    encoder.encode(sample[:8], show_progress_bar=False)
    t0 = time.perf_counter()
    encoder.encode(sample, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    enc = len(sample) / (time.perf_counter() - t0)
    rows.append((f"dense encoding docs/s (MiniLM, {len(sample)} pool docs)", f"{enc:.1f}"))
    rows.append(("  => time to embed the whole pool", f"{len(store) / enc / 60:.0f} min (extrapolated)"))
    if opts.dense_full:
        full = D.DenseIndex(store)
        emb = full.embeddings
        label = "real pool embeddings"
    else:
        cached = D.DenseIndex.cache_path(store)
        emb = np.load(cached, mmap_mode="r") if os.path.exists(cached) else None
        label = "real pool embeddings (cached)"
        if emb is None:
            rng = np.random.default_rng(0)
            emb = rng.standard_normal((len(store), 384)).astype(np.float16)
            emb /= np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
            label = "random unit vectors of the pool's shape (search cost only)"
    t0 = time.perf_counter()
    for q in queries[:50]:
        qv = encoder.encode([q], normalize_embeddings=True, show_progress_bar=False)
        D.blocked_top_k(np.asarray(qv, dtype=np.float32), emb, 1000)
    rows.append((f"dense per-query latency (encode + exact top-1000 of {len(store)} x 384 f16)",
                 f"{(time.perf_counter() - t0) / 50 * 1000:.0f} ms; {label}"))
    qv = encoder.encode(queries, normalize_embeddings=True, show_progress_bar=False)
    t0 = time.perf_counter()
    D.blocked_top_k(np.asarray(qv, dtype=np.float32), emb, 1000)
    rows.append(("dense batched search, 200 queries (no encoding)", f"{(time.perf_counter() - t0) * 1000 / 200:.1f} ms/query"))
    del encoder, emb


def tracin_speed(store, queries, fast_rank, opts, rows):
    from ssae_common.data.models import document_activations, load_model
    from ssae_common.sae.autoencoder import SAE
    from ssae_common.retrieval.tracin import check_saes, tracin_rerank_scores

    saes = [SAE.load(p) for p in opts.sae]
    model_name, hook = check_saes(saes, opts.sae)
    lm = load_model(model_name or "smollm2")
    cand = [store.record(int(p))["text"] for p in fast_rank[0].positions[:opts.tracin_docs]]
    t0 = time.perf_counter()
    seed_acts = document_activations(lm, queries, hook).acts
    t_seed = time.perf_counter() - t0
    t0 = time.perf_counter()
    cand_acts = document_activations(lm, cand, hook).acts
    t_act = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracin_rerank_scores(saes, seed_acts, [])  # the seeds' mean gradient alone
    t_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracin_rerank_scores(saes, seed_acts, cand_acts)
    t_score = max(time.perf_counter() - t0 - t_grad, 0.0)
    rows.append((f"TracIn docs/s ({len(cand)} candidates, {len(saes)} ckpt, d_sae {saes[0].d_sae}, "
                 f"<=128 tokens, LM + score)",
                 f"{len(cand) / (t_act + t_score):.2f} (LM {t_act:.1f} s, scoring {t_score:.2f} s); once per run: "
                 f"the 200 seeds' activations {t_seed:.1f} s, their mean gradient {t_grad:.1f} s"))


def quality(store, opts, work, rows):
    log: list[str] = []
    n_arxiv_pool = sum(1 for i in range(len(store)) if store.ids[i].startswith("arxiv:"))
    rows.append(("pool base rate of arXiv documents", f"{n_arxiv_pool / len(store):.1%} ({n_arxiv_pool}/{len(store)})"))
    seeds_path = opts.seeds
    # top-k output is a prefix of a longer run's output (no reranking), so one run gives both the
    # share in the top 1000 and the R-precision (share in the top R, R = arXiv documents present)
    deep = max(opts.top, n_arxiv_pool)
    methods_full = ("bm25", "dense", "hybrid") if opts.dense_full else ("bm25",)
    for method in methods_full:
        recs, took = retrieve([seeds_path, "--corpus", opts.pool, "--top-k", deep, "--method", method,
                               "--depth", 2 * deep], log)
        rows.append((f"arXiv share, {method} top-{opts.top} (full pool)", f"{arxiv_share(recs[:opts.top])} [{took:.0f} s]"))
        rows.append((f"arXiv share, {method} top-{n_arxiv_pool} = R-precision (full pool)", arxiv_share(recs[:deep])))
    sae_args = [a for p in opts.sae for a in ("--sae", p)]
    if opts.sae and opts.tracin_full:
        recs, took = retrieve([seeds_path, "--corpus", opts.pool, "--top-k", opts.top, "--method", "bm25",
                               "--rerank", "tracin", *sae_args], log)
        rows.append((f"arXiv share, bm25+tracin top-{opts.top} (full pool; pool x3)", f"{arxiv_share(recs)} [{took:.0f} s]"))
    if opts.quality_every:
        sub = subset(opts.pool, opts.quality_every, os.path.join(work, "bench"))
        n_sub = sum(1 for _ in open(sub))
        n_arxiv = sum(json.loads(line).get("source") == ARXIV for line in open(sub))
        top = max(opts.top // opts.quality_every, 1)
        rows.append((f"subset: every {opts.quality_every}th pool doc", f"{n_sub} docs, {n_arxiv} arXiv "
                     f"({n_arxiv / n_sub:.1%}); top-{top} compared"))
        for method in ("bm25", "dense", "hybrid"):
            recs, took = retrieve([seeds_path, "--corpus", sub, "--top-k", max(top, n_arxiv), "--method", method], log)
            rows.append((f"arXiv share, {method} top-{top} (subset)", f"{arxiv_share(recs[:top])} [{took:.0f} s]"))
            rows.append((f"arXiv share, {method} top-{n_arxiv} = R-precision (subset)", arxiv_share(recs[:max(top, n_arxiv)])))
            if opts.sae and method != "hybrid":
                recs, took = retrieve([seeds_path, "--corpus", sub, "--top-k", top, "--method", method,
                                       "--rerank", "tracin", *sae_args], log)
                rows.append((f"arXiv share, {method}+tracin top-{top} (subset)", f"{arxiv_share(recs)} [{took:.0f} s]"))

    rows.append(("__log__", "".join(log)))


def report(rows, cpu, work):
    log = "".join(v for k, v in rows if k == "__log__")
    rows = [(k, v) for k, v in rows if k != "__log__"]
    width = max(len(k) for k, _ in rows)
    print(f"ssae-retrieve benchmark: {cpu}; SSAE_WORKDIR={work}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  load average at end: {os.getloadavg()[0]:.1f}")
    print("commands run:")
    print(log, end="")


if __name__ == "__main__":
    main()
