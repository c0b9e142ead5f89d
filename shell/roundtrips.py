"""The round-trip figures of docs/formats.md: an SAE (d_in 64, d_sae 512, act_scale 0.37) written by
ssae-export, loaded and saved again by SAELens or sparsify with their own functions (in the peers venv),
and imported back; max abs differences of the reconstructions of 4096 rows.  `make -C shell roundtrips`."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import random_sae  # noqa: E402

from ssae_common.sae.export import write  # noqa: E402
from ssae_common.sae.imports import load_any  # noqa: E402

PEERS = os.environ.get("SSAE_PEERS_PYTHON") or os.path.join(ROOT, ".peers-venv", "bin", "python")


def main() -> None:
    if not os.path.exists(PEERS):
        sys.exit(f"no peers environment at {PEERS}: make -C shell peers")
    root = tempfile.mkdtemp(prefix="ssae-roundtrips-")
    x = (np.random.default_rng(1).standard_normal((4096, 64)) * 3 + 1).astype(np.float32)
    np.save(f"{root}/x.npy", x)
    source = open(os.path.join(ROOT, "tests", "test_formats.py")).read()
    open(f"{root}/peer.py", "w").write(source.split('PEER_SCRIPT = """')[1].split('"""')[0])
    print("| architecture | library | library vs ssae | re-imported vs ssae | max abs x_hat |")
    print("|---|---|---|---|---|")
    for arch, to in [("relu", "saelens"), ("topk", "saelens"), ("jumprelu", "saelens"), ("batchtopk", "saelens"),
                     ("matryoshka-batchtopk", "saelens"), ("topk", "sparsify")]:
        sae = random_sae(64, 512, 0, arch, k=None if arch in ("relu", "jumprelu") else 32, act_scale=0.37,
                         group_sizes=(16, 48, 448) if arch == "matryoshka-batchtopk" else None)
        if arch == "jumprelu":
            sae.threshold.data = torch.rand(512, generator=torch.Generator().manual_seed(3)) * 0.5
        elif sae.arch.threshold:
            sae.threshold.data.fill_(0.3)
        sae.cfg = {"model": "m", "hook": "blocks.0.hook_resid_post"}
        with torch.no_grad():
            ref = sae(torch.from_numpy(x))[0].numpy()
        out, y, resaved = f"{root}/{arch}-{to}", f"{root}/y-{arch}-{to}.npy", f"{root}/re-{arch}-{to}"
        os.makedirs(out)
        write(sae, out, to)
        with open(f"{root}/job.json", "w") as f:
            json.dump([[to, out, y, resaved]], f)
        subprocess.run([PEERS, f"{root}/peer.py", f"{root}/job.json", f"{root}/x.npy"], check=True,
                       capture_output=True, env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": ""})
        with torch.no_grad():
            back = load_any(resaved)(torch.from_numpy(x))[0].numpy()
        print(f"| {arch} | {to} | {np.abs(np.load(y) - ref).max():.1e} | {np.abs(back - ref).max():.1e} | "
              f"{np.abs(ref).max():.1f} |")


if __name__ == "__main__":
    main()
