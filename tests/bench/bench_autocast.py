"""The numeric effect of ssae-fit's bfloat16 autocast (on by default on CUDA), measured on the CPU: two TopK
fits from the same initialisation on the same batches, one with the SAE forward under bf16 autocast and one
in float32, compared on held-out rows in float32 every `--every` steps (docs/benchmarks.md has the result).

    python tests/bench/bench_autocast.py [--steps 300] [--d-sae 1152] [--batch-size 512]

sae/trainer.py applies autocast only on CUDA; here torch.autocast is forced on for the CPU in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fit import D_IN, make_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d-sae", type=int, default=2 * D_IN)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    from ssae_common.data.activations import ActivationStore
    from ssae_common.data.batches import ActivationStream
    from ssae_common.sae import objective, train, trainer
    from ssae_common.sae.config import FitConfig

    real_autocast = torch.autocast

    def cpu_autocast(device_type, dtype=None, enabled=True, **kw):  # what train_step does on CUDA, on the CPU
        return real_autocast(device_type, dtype=dtype, enabled=enabled or forced["on"], **kw)

    forced = {"on": False}
    torch.autocast = cpu_autocast
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore(make_store(os.path.join(tmp, "a.h5"), 65536))
        steps, batch = args.steps, args.batch_size
        cfg = FitConfig(architecture="topk", d_sae=args.d_sae, k=32, batch_size=batch, train_tokens=steps * batch,
                        val_tokens=0, lr=4e-4).resolve(D_IN, steps * batch)
        stream = ActivationStream([store], batch, 0, shuffle_rows=32768, val_rows=4096)
        val = torch.from_numpy(np.asarray(stream.validation(), dtype=np.float32))
        sae0 = train.init_sae(cfg, D_IN, stream.sample(4096), None)
        trainers = {}
        for name in ("fp32", "bf16"):
            sae = type(sae0)(sae0.d_in, sae0.d_sae, sae0.architecture, sae0.k, sae0.act_scale)
            sae.load_state_dict(sae0.state_dict())
            trainers[name] = trainer.Trainer(cfg, sae, stream, os.path.join(tmp, name), np.empty((0, D_IN), np.float32))
        print(f"TopK d_in {D_IN} d_sae {args.d_sae} k 32, batch {batch}, {steps} steps; held-out mse (float32 forward)")
        print(f"{'step':>6}{'fp32 mse':>12}{'bf16 mse':>12}{'rel diff':>10}")
        for s in range(steps):
            rows = torch.from_numpy(stream.batch(s))
            for name, t in trainers.items():
                forced["on"] = name == "bf16"
                t.train_step(rows * t.sae.act_scale)
            forced["on"] = False
            if (s + 1) % args.every == 0 or s + 1 == steps:
                with torch.no_grad():
                    mse = {n: float(objective.token_losses(t.sae, val * t.sae.act_scale, 0.0, inference=True)[1].mean())
                           for n, t in trainers.items()}
                print(f"{s + 1:>6}{mse['fp32']:>12.5f}{mse['bf16']:>12.5f}{mse['bf16'] / mse['fp32'] - 1:>+10.2e}",
                      flush=True)
        stream.close()
        store.close()


if __name__ == "__main__":
    main()
