"""Benchmark of ssae-explain's context extraction (make -C shell bench-explain).

Context extraction for --latents latents over a --tokens-token store: seconds and peak memory.  The store
is SYNTHETIC, made by this script: real text (../shared/data/general/pool.jsonl.gz when present, else
random words) tokenised with the bundled SmolLM2 tokenizer (the tiny test tokenizer if that is not
installed), with random float16 activations of width --d-model (576, SmolLM2's) in place of model
activations; the SAE is random with biases set for ~--density firing rate per latent.  The LM is not run.

Side by side, in the same run and each in a fresh process:
  * reference: one bare streaming pass that encodes every chunk through the SAE and keeps nothing: the
    floor any extraction that sees every token pays;
  * extraction: ssae_common.explain.contexts.extract_contexts (pass 1 + windows + token text).
Peak memory is the process's peak RSS (ru_maxrss) minus its RSS after imports.  For scale, the memory to
hold all latent activations at once (tokens x latents x 4 bytes) is printed too (computed, not run).
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tokenizer_source(folder: str) -> str:
    try:
        from ssae_common.data.models import resolve_model_path

        return resolve_model_path("smollm2")
    except Exception:
        from helpers import make_tiny_model

        return make_tiny_model(os.path.join(folder, "tiny"))


def texts():
    pool = os.path.join(DATA, "general", "pool.jsonl.gz")
    if os.path.exists(pool):
        while True:
            with gzip.open(pool, "rt", encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]
    from helpers import WORDS

    rng = random.Random(0)
    while True:
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))


def make_store(path: str, model: str, n_tokens: int, d_model: int, seed: int) -> None:
    from transformers import AutoTokenizer

    from ssae_common.data.activations import ActivationWriter

    tok = AutoTokenizer.from_pretrained(model)
    w = ActivationWriter(path, d_model=d_model, dtype="float16", resume=False,
                         attrs={"model": model, "hook": "blocks.6.hook_resid_post", "synthetic": True})
    rng = np.random.default_rng(seed)
    n, d = 0, 0
    source = texts()
    while n < n_tokens:
        batch = [next(source) for _ in range(256)]
        ids_list = tok(batch, add_special_tokens=False)["input_ids"]
        ids, doc_index, position, keep_text, keep_ids = [], [], [], [], []
        for text, t_ids in zip(batch, ids_list):
            t_ids = t_ids[:n_tokens - n - len(ids)]
            if not t_ids:
                continue
            ids += t_ids
            doc_index += [d] * len(t_ids)
            position += list(range(1, len(t_ids) + 1))
            keep_text.append(text)
            keep_ids.append(f"doc{d}")
            d += 1
        w.add_docs(keep_ids, keep_text, list(range(d - len(keep_ids), d)))
        acts = rng.standard_normal((len(ids), d_model), dtype=np.float32)
        w.add_rows(acts, np.array(ids, np.int32), np.array(doc_index, np.int32), np.array(position, np.int32))
        n += len(ids)
        w.checkpoint(d, d, 0)
    w.finish()


def make_sae(folder: str, d_model: int, d_sae: int, density: float, seed: int) -> None:
    import torch
    from scipy.stats import norm

    from ssae_common.sae.autoencoder import SAE

    torch.manual_seed(seed)
    sae = SAE(d_model, d_sae)
    sae.W_enc.data = torch.randn(d_model, d_sae) / d_model ** 0.5  # pre-activations ~ N(0, 1) on N(0, I) inputs
    sae.W_dec.data = sae.W_enc.data.T.clone()
    sae.b_enc.data = torch.full((d_sae,), -float(norm.ppf(1 - density)))
    os.makedirs(folder, exist_ok=True)
    sae.save(folder)


def _bare_pass(store_path, sae_path, latents, chunk_rows, queue):
    import torch

    from ssae_common.data.activations import ActivationStore
    from ssae_common.explain.contexts import LatentReader
    from ssae_common.sae.autoencoder import SAE

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = rss_mb()
    store, sae = ActivationStore(store_path), SAE.load(sae_path)
    reader = LatentReader(sae, latents)
    t0 = time.perf_counter()
    fired = 0
    for _, x in store.iter_chunks(rows=chunk_rows):
        fired += int((reader.columns(x) > 0).sum())
    took = time.perf_counter() - t0
    queue.put({"seconds": took, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
               "fired": fired})


def _extract(store_path, sae_path, latents, tokenizer, queue):
    import torch
    from transformers import AutoTokenizer

    from ssae_common.data.activations import ActivationStore
    from ssae_common.explain.config import ContextConfig
    from ssae_common.explain.contexts import extract_contexts
    from ssae_common.sae.autoencoder import SAE

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tok = AutoTokenizer.from_pretrained(tokenizer)
    base = rss_mb()
    store, sae = ActivationStore(store_path), SAE.load(sae_path)
    t0 = time.perf_counter()
    out = extract_contexts(store, sae, latents, ContextConfig(), tok)
    took = time.perf_counter() - t0
    queue.put({"seconds": took, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
               "windows": sum(len(c["explain"]) + len(c["score"]) for c in out),
               "fired": sum(c["n_active"] for c in out)})


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--folder", default=None, help="Where the synthetic store goes (default: a temp folder, removed).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    folder = args.folder or tempfile.mkdtemp(prefix="bench-explain.")
    os.makedirs(folder, exist_ok=True)
    store = os.path.join(folder, f"synthetic-{args.tokens}-{args.d_model}.h5")
    sae = os.path.join(folder, f"sae-{args.latents}")
    tokenizer = tokenizer_source(folder)
    t0 = time.perf_counter()
    if not os.path.exists(store):
        make_store(store + ".tmp", tokenizer, args.tokens, args.d_model, args.seed)
        os.replace(store + ".tmp", store)
    make_sae(sae, args.d_model, args.latents, args.density, args.seed)
    made = time.perf_counter() - t0
    latents = list(range(args.latents))
    chunk_rows = int(max(256, min(16384, (1 << 24) // args.latents)))

    ref = in_child(_bare_pass, store, sae, latents, chunk_rows)
    got = in_child(_extract, store, sae, latents, tokenizer)
    assert ref["fired"] == got["fired"], (ref["fired"], got["fired"])

    dense_gb = args.tokens * args.latents * 4 / 2**30
    print(f"ssae-explain context extraction: {args.latents} latents over a synthetic {args.tokens:,}-token store "
          f"(d_model {args.d_model}, float16, {os.path.getsize(store) / 2**30:.2f} GiB; tokenizer {tokenizer}; "
          f"made in {made:.0f} s)")
    print(f"{'':34}{'seconds':>10}{'tokens/s':>12}{'peak MB':>10}")
    for name, r in (("reference: bare SAE encode pass", ref), ("extract_contexts", got)):
        print(f"{name:34}{r['seconds']:10.1f}{args.tokens / r['seconds']:12,.0f}{r['peak_mb']:10.0f}")
    print(f"ratio extraction / bare pass: {got['seconds'] / ref['seconds']:.2f}x time; "
          f"{got['windows']:,} windows; mean density {got['fired'] / args.tokens / args.latents:.4f}")
    print(f"for scale: all latent activations at once would take {dense_gb:.1f} GiB")
    print(f"threads: {os.environ.get('BENCH_THREADS', '2')}; cores {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end (the machine may be shared)")
    if not args.folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
