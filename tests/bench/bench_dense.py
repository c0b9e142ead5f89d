"""Benchmark of dense encoding (make -C shell bench-dense): documents/s of each encoder runtime against
float32 sentence-transformers on the same pool documents, interleaved chunk by chunk in one run (so a
change of machine load hits every runtime alike), and whether each keeps the rankings: for every seed, the
overlap of its top-100 among those documents with float32's top-100.

    python tests/bench/bench_dense.py [--docs 2000] [--backends torch,auto,onnx-int8] [--max-length 128]
        [--chunk 250]

Documents: the first --docs of ../shared/data/general/pool.jsonl.gz; seeds: the 200 astro-ph seeds of
`make paper` (../shared/data/physics/astro_ph_seeds.jsonl).  --max-length 128 is what `make paper` uses.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)


def read_texts(path: str, n: int | None = None) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default=os.path.join(DATA, "general", "pool.jsonl.gz"))
    ap.add_argument("--seeds", default=os.path.join(DATA, "physics", "astro_ph_seeds.jsonl"))
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--backends", default="torch,auto,onnx-int8", help="the first is the reference")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=250, help="documents per interleaved timing chunk")
    ap.add_argument("--top", type=int, default=100)
    args = ap.parse_args()
    from ssae_common.core.runtime import configure_threads

    threads = configure_threads()
    import torch

    from ssae_common.retrieval import dense as D
    from ssae_common.retrieval.config import DEFAULT_DENSE_MODEL

    docs, seeds = read_texts(args.pool, args.docs), read_texts(args.seeds)
    names = []
    for spec in args.backends.split(","):
        name = D.resolve_dense_backend(spec, DEFAULT_DENSE_MODEL, "cpu")
        if name not in names:
            names.append(name)
    encoders = {}
    for name in names:
        encoders[name] = D.load_encoder(DEFAULT_DENSE_MODEL, "cpu", name)
        encoders[name].max_seq_length = args.max_length

    def encode(name, texts):
        emb = encoders[name].encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                    convert_to_tensor=name.startswith("torch"), show_progress_bar=False)
        return np.asarray(emb.float().numpy() if torch.is_tensor(emb) else emb, dtype=np.float32)

    with torch.inference_mode():
        for name in names:  # warm-up
            encode(name, docs[:args.batch_size])
        load = [os.getloadavg()[0]]
        seconds = dict.fromkeys(names, 0.0)
        parts: dict = {name: [] for name in names}
        for i, start in enumerate(range(0, len(docs), args.chunk)):
            chunk = docs[start:start + args.chunk]
            for name in (names if i % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                parts[name].append(encode(name, chunk))
                seconds[name] += time.perf_counter() - t
                print(f"  chunk {i + 1}: {name} {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
        queries = {name: encode(name, seeds) for name in names}
    corpus = {name: np.concatenate(parts[name]) for name in names}
    ref = names[0]
    top = {name: [set(r.positions.tolist()) for r in D.blocked_top_k(queries[name], corpus[name], args.top)]
           for name in names}
    print(f"dense encoding: bundled all-MiniLM-L6-v2, {len(docs)} pool documents, --max-length {args.max_length}, "
          f"batch {args.batch_size}; {len(seeds)} seeds; torch threads {threads}; CPU bfloat16 hardware "
          f"{D.native_bf16()}; 1-min load {load[0]:.1f} -> {load[1]:.1f}; runtimes interleaved by {args.chunk}-doc "
          f"chunks")
    print(f"{'runtime':<14}{'docs/s':>10}{'x ' + ref:>10}{'top-' + str(args.top) + ' overlap mean':>22}{'min':>8}"
          f"{'cos to ' + ref + ' min':>20}")
    for name in names:
        overlap = [len(a & b) / max(1, len(b)) for a, b in zip(top[name], top[ref])]
        cos = np.sum(corpus[name] * corpus[ref], axis=1)
        print(f"{name:<14}{len(docs) / seconds[name]:>10.1f}{seconds[ref] / seconds[name]:>10.2f}"
              f"{np.mean(overlap):>22.3f}{np.min(overlap):>8.2f}{np.min(cos):>20.4f}")
    print(f"auto on this CPU: {D.resolve_dense_backend('auto', DEFAULT_DENSE_MODEL, 'cpu')}")


if __name__ == "__main__":
    main()
