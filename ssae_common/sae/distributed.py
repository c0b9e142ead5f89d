"""Data-parallel training under torchrun (WORLD_SIZE > 1): every rank takes its slice of each global batch of
`batch_size` tokens, gradients are summed across ranks with one all-reduce per step, and TERM is computed over
the global batch (the per-token losses are all-gathered, so the log-sum-exp sees the global max and sum).
Rank 0 initialises, reads/writes checkpoints, logs and writes the output."""
from __future__ import annotations

import logging
import os

import torch

from ..core.errors import BadInput

log = logging.getLogger("ssae")


class DataParallel:
    """The ranks of a torchrun job, or one process (rank 0 of 1, where every method is a no-op).

    Collectives on tensors use the default group (nccl on CUDA, gloo on CPU); the stop flag and
    Python objects go through a gloo group, so they never wait on the GPU."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, control=None):
        self.rank, self.world, self.local_rank, self.control = rank, world, local_rank, control

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """cuda -> cuda:LOCAL_RANK for a torchrun rank."""
        return f"cuda:{self.local_rank}" if self.active and device.startswith("cuda") else device

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a global batch of n rows (contiguous, sizes differ by <= 1)."""
        r = self.rank if rank is None else rank
        return r * n // self.world, (r + 1) * n // self.world

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as tdist
            tdist.all_reduce(tensor)
        return tensor

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The global vector of n values from every rank's slice, in rank order; only this rank's part
        carries gradient (the others are detached copies)."""
        if not self.active:
            return local
        import torch.distributed as tdist
        size = max(hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.world)))
        padded = local.new_zeros(size)
        padded[:local.numel()] = local.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        parts = [p[:hi - lo] for p, (lo, hi) in zip(parts, (self.bounds(n, r) for r in range(self.world)))]
        parts[self.rank] = local
        return torch.cat(parts)

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as tdist
            tdist.all_reduce(tensor, op=tdist.ReduceOp.MIN)
        return tensor

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        import torch.distributed as tdist
        t = torch.tensor([int(flag)])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled, through the gloo group)."""
        if not self.active:
            return obj
        import torch.distributed as tdist
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist
            tdist.barrier(group=self.control)


_DATA_PARALLEL: DataParallel | None = None


def data_parallel(device: str) -> DataParallel:
    """The torchrun job this process belongs to (from WORLD_SIZE, RANK, LOCAL_RANK), its process group
    initialised on first use: nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU."""
    global _DATA_PARALLEL
    if _DATA_PARALLEL is not None:
        return _DATA_PARALLEL
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if None in env.values() or int(env["WORLD_SIZE"]) <= 1:
        _DATA_PARALLEL = DataParallel()
        return _DATA_PARALLEL
    import atexit

    import torch.distributed as tdist
    world, rank, local_rank = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
    cuda = device.startswith("cuda")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise BadInput(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA device(s) on this node")
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(lambda: tdist.is_initialized() and tdist.destroy_process_group())
    control = tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else None
    _DATA_PARALLEL = DataParallel(rank, world, local_rank, control)
    if rank == 0:
        log.info("training data-parallel over %d ranks (%s)", world, tdist.get_backend())
    return _DATA_PARALLEL
