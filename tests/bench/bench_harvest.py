"""Harvest throughput against the bare forward pass up to the same layer, and peak memory at two
token counts, on the bundled model.  Run by `make -C shell bench-harvest`.

The reference is the Hugging Face model itself, truncated to the hooked layer (no TransformerLens,
no tokenising, no writing), on exactly the same padded batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, run_peak_rss  # noqa: E402

from ssae_common.data.config import HarvestConfig  # noqa: E402
from ssae_common.data.harvester import _batches, _Counter, harvest_activations, iter_windows  # noqa: E402
from ssae_common.data.models import load_model  # noqa: E402
from ssae_common.core.records import iter_docs  # noqa: E402
from helpers_docs import write_docs  # noqa: E402


def bare_forward(model, batches, layer):
    hf = model.bridge.original_model
    inner = hf.model
    layers = inner.layers
    inner.layers = layers[:layer + 1]  # truncate: the pass stops after the hooked layer
    try:
        start = time.perf_counter()
        n = 0
        with torch.inference_mode():
            for tokens in batches:
                hidden = inner(tokens, output_hidden_states=True).hidden_states[layer + 1]
                n += hidden.shape[0] * (hidden.shape[1])
        return time.perf_counter() - start
    finally:
        inner.layers = layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="bench-harvest.")
    docs_path = write_docs(os.path.join(tmp, "docs.jsonl"), 4000)
    model = load_model("smollm2")
    hook = f"blocks.{args.layer}.hook_resid_post"
    cfg = HarvestConfig(hook=hook, context_size=128, batch_size=16, max_tokens=args.tokens, dtype="float16")

    # the same windows and batches as the harvest makes, tokenised up front for the reference
    windows = iter_windows(model, iter_docs([docs_path]), cfg, {"next_input_doc": 0, "next_window": 0}, _Counter())
    batches, stored = [], 0
    for batch in _batches(windows, cfg.batch_size):
        batches.append(model.padded([model.with_bos(w.tokens) for w in batch]))
        stored += sum(len(w.tokens) for w in batch)
        if stored >= args.tokens:
            break

    harvest_s, bare_s = [], []
    for r in range(args.rounds):  # interleaved, so machine noise hits both alike
        bare_s.append(bare_forward(model, batches, args.layer))
        out = os.path.join(tmp, f"acts{r}.h5")
        start = time.perf_counter()
        harvest_activations(model, iter_docs([docs_path]), out, cfg,
                            {"model": "smollm2", "hook": hook, "config": {}}, quiet=True)
        harvest_s.append(time.perf_counter() - start)
        os.remove(out)
    bare, hv = min(bare_s), min(harvest_s)
    print(f"harvest throughput, SmolLM2-135M to {hook}, {args.tokens} tokens, best of {args.rounds}")
    print(f"  bare forward (HF, truncated): {args.tokens / bare:10.0f} tokens/s")
    print(f"  ssae harvest (end to end):    {args.tokens / hv:10.0f} tokens/s")
    print(f"  ratio harvest / bare:         {bare / hv:10.3f}   (target >= 0.90)")

    print("peak resident memory of a whole ssae-harvest process")
    for n in (args.tokens // 4, args.tokens):
        secs, rss = run_peak_rss([os.path.join(BIN, "ssae-harvest"), docs_path, "--max-tokens", str(n), "--layer",
                                  str(args.layer), "-o", os.path.join(tmp, f"m{n}.h5"), "--quiet"])
        print(f"  {n:8d} tokens: {rss:8.0f} MiB  ({secs:.0f} s)")


if __name__ == "__main__":
    main()
