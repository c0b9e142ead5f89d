"""Run-time settings every stage shares: device choice (and the CUDA defaults), CPU thread count, seeding,
SLURM array sharding."""
from __future__ import annotations

import os
import random
import sys
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


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_v2_limit(root: str, own_path: str) -> float | None:
    """The tightest `cpu.max` quota (in CPUs) from the process's own cgroup up to the root."""
    limits = []
    path = own_path.strip("/")
    while True:
        try:
            with open(os.path.join(root, path, "cpu.max")) as f:
                quota, period = (f.read().split() + ["100000"])[:2]
        except (OSError, ValueError):
            quota = "max"
        if quota != "max":
            try:
                limits.append(int(quota) / int(period))
            except (ValueError, ZeroDivisionError):
                pass
        if not path:
            return min(limits) if limits else None
        path = os.path.dirname(path)


def _cgroup_v1_limit(root: str) -> float | None:
    """The CFS quota (in CPUs) of a cgroup v1 cpu controller; -1 means none."""
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            with open(os.path.join(root, folder, "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(root, folder, "cpu.cfs_period_us")) as f:
                period = int(f.read())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def _own_cgroup_v2() -> str:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "/"


def available_cpus(cgroup_root: str = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 cpu.max, or v1
    cpu.cfs_quota_us), rounded down (a 1.5-CPU quota runs one thread without throttling), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_v2_limit(cgroup_root, _own_cgroup_v2())
    if quota is None:
        quota = _cgroup_v1_limit(cgroup_root)
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def thread_count(environ=None, cgroup_root: str = CGROUP_ROOT) -> int:
    """Torch threads: SSAE_THREADS when set (a positive integer), else available_cpus()."""
    environ = os.environ if environ is None else environ
    value = environ.get("SSAE_THREADS", "").strip()
    if not value:
        return available_cpus(cgroup_root)
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"SSAE_THREADS={value}: expected a positive number of CPU threads")
    return int(value)


def configure_threads(environ=None) -> int:
    """Size torch's intra-op and inter-op pools from thread_count(); returns the intra-op count.
    torch's own default counts every core of the machine, not those the process may use, and more
    threads than CPUs make every parallel region wait for a thread that is not running.

    Before torch is first imported it also sets OMP_WAIT_POLICY=PASSIVE (unless set): OpenMP threads then
    sleep at the end of a parallel region instead of spinning, so on a machine shared with other jobs
    they give the CPU back rather than spend the time slice that a thread of the same region needs
    (docs/benchmarks.md, "Eval pace")."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    n = thread_count(environ)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # fixed once inter-op work has run (e.g. a second tool called in one process)
        pass
    return n


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
