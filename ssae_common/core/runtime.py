"""Run-time settings every stage shares: device choice (and the CUDA defaults), seeding, SLURM array sharding."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from .config import ConfigError
from .errors import BadInput


def parse_shard(value: str | None) -> tuple[int, int]:
    """`i/n` (0-based), defaulting from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT.  Errors name the
    config field `shard`."""
    if not value:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return 0, 1
        value = f"{int(task) - int(os.environ.get('SLURM_ARRAY_TASK_MIN', 0))}/{count}"
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise ConfigError("shard", value, "expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError("shard", value, "need 0 <= i < n")
    return i, n


def resolve_device(spec: str) -> str:
    """The device of `--device SPEC`; a CUDA one gets the CUDA defaults (cuda_defaults) first."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device_spec", spec, "CUDA is not available on this machine")
        if ":" in spec and int(spec.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError("device_spec", spec, f"only {torch.cuda.device_count()} CUDA device(s)")
        cuda_defaults()
        return spec
    if spec != "cpu":
        raise ConfigError("device_spec", spec, "expected auto, cpu or cuda[:N]")
    return spec


def tf32_enabled() -> bool:
    """SSAE_TF32: 1 (default) or 0."""
    value = os.environ.get("SSAE_TF32", "1")
    if value not in ("0", "1"):
        raise BadInput(f"SSAE_TF32={value}: expected 0 (float32 matmuls in full precision) or 1 (TF32, the default)")
    return value == "1"


def cuda_defaults() -> None:
    """Float32 matmuls on CUDA in TF32 (10-bit mantissa inputs, float32 accumulation: the tensor cores, as
    sparsify and most trainers run), unless SSAE_TF32=0. CPU matmuls are not affected."""
    import torch

    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32_enabled() else "ieee"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """What every stage run shares besides its own config: device, seed, overwrite and verbosity.

    From Python: `RunContext(device_spec="cpu", seed=1)`; the tools build one from --device, --seed, --force
    and --quiet.  `tool` names the caller in provenance ("ssae-fit", or "python" for library use)."""

    tool: str = "python"
    device_spec: str = "auto"
    seed: int = 0
    quiet: bool = False
    force: bool = False

    @property
    def device(self) -> str:
        return resolve_device(self.device_spec)

    @property
    def program(self) -> str:
        return self.tool if self.tool == "python" else f"ssae-{self.tool}"

    def resolved(self, **options) -> dict:
        """The resolved configuration stored in artifacts."""
        return {"tool": self.program, "seed": self.seed, **options}
