"""Matryoshka BatchTopK against BatchTopK on real activations: the bundled SmolLM2 at blocks.6.hook_resid_post
on the general pool (../shared/data), both fitted with the same k, width, steps and seeds by ssae-fit and
evaluated by ssae-eval on held-out documents (FVU, L0), plus the FVU of each prefix of the Matryoshka
groups (the first 1/32, 3/32, ... of the latents alone), for both SAEs on the same latent counts.

    make -C shell bench-matryoshka   (or: python tests/bench/bench_matryoshka.py [--quick])

Training documents are the pool's even-numbered ones (--shard 0/2), test documents its odd-numbered ones
(--shard 1/2): the same distribution, no document in both.  The activation files and SAEs are kept under
--workdir and reused by a rerun with the same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POOL = os.path.join(ROOT, "..", "shared", "data", "general", "pool.jsonl.gz")
HOOK = "blocks.6.hook_resid_post"
ARCHITECTURES = ("batchtopk", "matryoshka-batchtopk")


def tool(name: str, *args: str) -> list[dict]:
    """Run ssae-NAME (installed beside this interpreter) and return the records it prints."""
    command = os.path.join(os.path.dirname(sys.executable), f"ssae-{name}")
    done = subprocess.run([command, *args, "--device", "cpu", "-q"],
                          stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def harvest(path: str, shard: str, tokens: int) -> str:
    if not os.path.exists(path):
        tool("harvest", POOL, "--hook", HOOK, "--shard", shard, "--max-tokens", str(tokens), "-o", path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("SSAE_WORKDIR", "ssae-work"), "bench-matryoshka"))
    ap.add_argument("--train-tokens", type=int, default=40960, help="tokens harvested for training")
    ap.add_argument("--test-tokens", type=int, default=8192, help="held-out tokens harvested for ssae-eval")
    ap.add_argument("--d-sae", type=int, default=1152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--quick", action="store_true", help="a small run that checks the bench works")
    args = ap.parse_args()
    if args.quick:
        args.train_tokens, args.test_tokens, args.d_sae, args.steps, args.seeds = 8192, 2048, 256, 20, "0"
    if not os.path.exists(POOL):
        sys.exit(f"bench-matryoshka: {POOL} is not there (the shared data folder)")
    os.makedirs(args.workdir, exist_ok=True)
    tag = f"{args.train_tokens}"
    train = harvest(os.path.join(args.workdir, f"train-{tag}.h5"), "0/2", args.train_tokens)
    test = harvest(os.path.join(args.workdir, f"test-{args.test_tokens}.h5"), "1/2", args.test_tokens)

    saes = {}
    for arch in ARCHITECTURES:
        out = os.path.join(args.workdir, f"{arch}-d{args.d_sae}-k{args.k}-b{args.batch_size}-s{args.steps}-{tag}")
        if not os.path.isdir(out):
            tool("fit", train, "--architecture", arch, "--k", str(args.k), "--d-sae", str(args.d_sae),
                 "--batch-size", str(args.batch_size), "--train-tokens", str(args.steps * args.batch_size),
                 "--val-tokens", "2048", "--seed", args.seeds, "-o", out)
        saes[arch] = sorted(os.path.join(folder, name) for folder in [out] for name in [""] + os.listdir(out)
                            if os.path.exists(os.path.join(folder, name, "cfg.json")))
    paths = [p for arch in ARCHITECTURES for p in saes[arch]]
    evaluated = os.path.join(args.workdir, f"eval-{len(paths)}-{tag}-d{args.d_sae}-s{args.steps}", "metrics.json")
    if not os.path.exists(evaluated):
        evaluated = tool("eval", *paths, "--activations", test, "-o", os.path.dirname(evaluated))[0]["path"]
    metrics = {s["path"]: s for s in json.load(open(evaluated))["saes"]}
    table(args, saes, metrics, test)


def table(args, saes: dict, metrics: dict, test: str) -> None:
    import torch

    from ssae_common.data.activations import ActivationStore
    from ssae_common.sae.architectures.matryoshka import prefix_fvu
    from ssae_common.sae.imports import load_any

    store = ActivationStore(test)
    x = torch.from_numpy(store.rows(0, store.n_tokens).astype("float32"))
    store.close()
    ends = None
    rows = []
    for arch in reversed(ARCHITECTURES):  # the Matryoshka SAE's group ends first
        for path in saes[arch]:
            sae = load_any(path)
            if ends is None:
                ends = torch.tensor(sae.group_sizes).cumsum(0).tolist()
            m = metrics[os.path.abspath(path)]
            cfg = json.load(open(os.path.join(path, "cfg.json")))
            rows.append((arch, cfg["seed"], m["fvu"], m["l0"], prefix_fvu(sae, x * sae.act_scale, ends)))
    print(f"SmolLM2-135M {HOOK}, {args.train_tokens} training tokens (pool --shard 0/2), test "
          f"{len(x)} tokens (--shard 1/2); d_sae {args.d_sae}, k {args.k}, batch {args.batch_size}, "
          f"{args.steps} steps; prefix FVU: the first n latents alone")
    print("| architecture | seed | FVU | L0 | " + " | ".join(f"prefix {e}" for e in ends) + " |")
    print("|---|---|---|---|" + "---|" * len(ends))
    for arch, seed, fvu, l0, prefixes in sorted(rows):
        print(f"| {arch} | {seed} | {fvu:.4f} | {l0:.1f} | " + " | ".join(f"{p:.3f}" for p in prefixes) + " |")


if __name__ == "__main__":
    main()
