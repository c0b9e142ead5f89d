"""Training SAEs with ERM or tilted ERM, from scratch or finetuned from a parent SAE (GSAE -> SSAE).

Per-token loss, in normalised units (inputs multiplied by act_scale so that E||x||^2 = d_in):

    l_i = ||x_hat_i - x_i||^2 / d_in  +  lambda * sum_j f_ij * ||W_dec_j||     (the L1 term: relu only)
                                      +  lambda_0 * #{j : pre_ij > threshold_j}    (the L0 term: jumprelu only)

and the objective of each batch is TERM(l, t) (term.py; t = 0 is the mean), plus, for TopK with
AuxK, aux_coefficient * the normalised AuxK loss of dead latents.  t is --tilt, or with --tilt-ess F the t
solved on the batch's detached losses so that the weights' effective sample size is F x batch
(term.solve_tilt).  With --tilt-groups token the tilt acts across token types: each token's loss in the
TERM is its type's mean loss in the batch (term.group_means; the batches carry the token ids).  The t used
is logged (its mean over the steps since the last record) with the weights' ESS fraction.

JumpReLU (Rajamanoharan et al. 2024, trained as SAELens 6 does): the threshold gets its gradient from a
straight-through estimator with a rectangle kernel of width `bandwidth` (from the reconstruction through
JumpReLU and from the L0 term through the step function; the pre-activations get none from the step),
starts at 0.01 and is kept >= 0.  BatchTopK keeps the k x batch largest activations of the whole batch
(each rank's slice under torchrun) and tracks its inference threshold as a running average (rate 0.01)
of the smallest activation kept, as SAELens does.

Adam; linear learning-rate warm-up, constant, linear decay to 0 over the last `decay_fraction`; L1
coefficient warm-up; decoder rows kept at unit norm (gradient component along each row removed
before the step, rows renormalised after).  Batches come from `ActivationStream`, a pure function of
(seed, step), so a checkpoint (weights, Adam state, counters, RNG states, the step) resumes exactly.

Under torchrun (WORLD_SIZE > 1) the same code trains data-parallel: every rank takes its slice of each
global batch of `batch_size` tokens, gradients are summed across ranks with one all-reduce per step, and
TERM is computed over the global batch (the per-token losses are all-gathered, so the log-sum-exp sees
the global max and sum).  Rank 0 initialises, reads/writes checkpoints, logs and writes the output.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.activations import ActivationStore
from ..data.batches import ActivationStream
from ..core.config import ConfigError
from ..core.errors import BadInput, Interrupted
from ..core.outputs import atomic_dir, check_target, exclusive, partial_path, sha256_file
from ..core.progress import Progress
from ..core.signals import StopFlag
from . import sparse as sparse_ops
from .autoencoder import SAE
from .config import FitConfig
from .term import group_means, solve_tilt, tilted_loss, tilt_weights

log = logging.getLogger("ssae")
CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
STATE = "partial.json"
SMALL_STEP = 10**8  # batch x d_in x d_sae below which CPU training runs on one thread
# per-step statistics accumulated on the device between log records (read back only when logging)
ACC_GLOBAL = ("objective", "tilt", "ess_fraction", "max_weight_x_n")  # same value on every rank
ACC_LOCAL = ("loss", "mse", "l0", "aux")  # sums over this rank's tokens (aux: this rank's share)
ACC = ACC_GLOBAL + ACC_LOCAL


class Adam:
    """Adam (Kingma & Ba) over a few parameters.  Plain tensor ops: no torch.optim machinery (whose
    first step imports the compiler stack, seconds of start-up), and a state that is easy to save."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            # lr * (m / c1) / (sqrt(v / c2) + eps), with one pass fewer over the weights
            denom = v.sqrt().add_(self.eps * math.sqrt(c2))
            p.addcdiv_(m, denom, value=-lr * math.sqrt(c2) / c1)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [m.cpu() for m in self.m], "v": [v.cpu() for v in self.v]}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)


# --- data parallel (torchrun) --------------------------------------------------------------------
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


# --- schedules ------------------------------------------------------------------------------------
def lr_at(cfg: FitConfig, step: int) -> float:
    steps = cfg.steps
    warm = min(cfg.warmup_steps, steps // 10)
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    decay_start = steps - int(steps * cfg.decay_fraction)
    if step >= decay_start and steps > decay_start:
        return cfg.lr * max(0.0, (steps - step) / (steps - decay_start))
    return cfg.lr


def l1_at(cfg: FitConfig, step: int) -> float:
    warm = int(cfg.steps * cfg.l1_warmup_fraction)
    return cfg.l1 * min(1.0, (step + 1) / warm) if warm else cfg.l1


# --- initialisation -------------------------------------------------------------------------------
@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, starting from the mean."""
    guess = points.mean(0)
    for _ in range(iterations):
        dist = (points - guess).norm(dim=1).clamp_min(1e-8)
        w = 1.0 / dist
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - guess).norm() <= tol * max(1.0, float(guess.norm())):
            return new
        guess = new
    return guess


def act_scale_of(sample: np.ndarray) -> float:
    msq = float(np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1)))
    if not msq > 0:
        raise BadInput("activations are all zero: cannot normalise them")
    return math.sqrt(sample.shape[1] / msq)


@torch.no_grad()
def unit_norm_decoder(sae: SAE) -> float:
    """Make decoder rows unit norm, moving the scale into the encoder (exact for ReLU: the
    activation is positively homogeneous).  Returns the largest relative change of a row norm."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
    change = float((norms - 1).abs().max())
    sae.W_dec.div_(norms[:, None])
    sae.W_enc.mul_(norms[None, :])
    sae.b_enc.mul_(norms)
    if sae.architecture in ("jumprelu", "batchtopk"):
        sae.threshold.mul_(norms)  # the pre-activations scale with the norms
    return change


def init_sae(cfg: FitConfig, d_in: int, sample: np.ndarray, parent: SAE | None) -> SAE:
    gen = torch.Generator().manual_seed(cfg.seed)
    if parent is not None:
        sae = parent  # keeps the parent's act_scale: its weights expect inputs on that scale
        sae.cfg = {}
        change = unit_norm_decoder(sae)
        if change > 1e-3:
            log.warning("--init: parent decoder rows were not unit norm (up to %.3g off); renormalised%s", change,
                        "" if sae.architecture in ("relu", "jumprelu") else " (TopK selection may change slightly)")
    else:
        sae = SAE(d_in, cfg.d_sae, cfg.architecture, cfg.k, act_scale_of(sample) if cfg.normalize else 1.0)
        with torch.no_grad():
            w = torch.randn(cfg.d_sae, d_in, generator=gen)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.zero_()
            if cfg.architecture == "jumprelu":
                sae.threshold.fill_(JUMPRELU_INIT_THRESHOLD)
    x = torch.from_numpy(sample) * sae.act_scale
    with torch.no_grad():
        if cfg.b_dec_init == "median":
            sae.b_dec.copy_(geometric_median(x))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(x.mean(0))
        elif cfg.b_dec_init == "zero":
            sae.b_dec.zero_()
    return sae


# --- the model step -------------------------------------------------------------------------------
JUMPRELU_INIT_THRESHOLD = 0.01  # SAELens 6 (normalised units)
BATCHTOPK_THRESHOLD_RATE = 0.01  # SAELens 6's topk_threshold_lr


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * 1[pre > threshold]; d/dpre = the step, d/dthreshold = -(threshold / bw) K((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_threshold = -(threshold / bw) * _rectangle((pre - threshold) / bw) * grad
        return (pre > threshold) * grad, g_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """1[pre > threshold]; d/dpre = 0, d/dthreshold = -(1 / bw) K((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_threshold = -(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad
        return torch.zeros_like(pre), g_threshold.reshape(-1, pre.shape[-1]).sum(0), None


def encode_train(sae: SAE, x: torch.Tensor, bandwidth: float = 0.05, inference: bool = False,
                 sparse: bool = False, pre_out: torch.Tensor | None = None):
    """(f, pre-activations, top-k indices, top-k values) for normalised inputs; index/values are None
    for relu.  (x - b_dec) @ W_enc is computed as x @ W_enc - b_dec @ W_enc so that b_dec's gradient
    does not cost a batch x d_in x d_sae matmul; for TopK, ReLU is applied to the k selected values only
    (same output as top-k of ReLU(pre): rows with fewer than k positive entries just add zeros).
    `sparse` (TopK): f is None and pre carries no gradient; the values get theirs through sparse.pre_at;
    `pre_out` a [batch, d_sae] float32 tensor to hold pre (reused across steps: a fresh one of that size
    page-faults every step, 10% of a one-thread CPU step at d_sae 4608)."""
    if sparse:
        bias = sae.b_enc - sae.b_dec @ sae.W_enc
        with torch.no_grad():
            pre = torch.addmm(bias, x, sae.W_enc, out=pre_out)
            index = pre.topk(sae.k, dim=-1, sorted=False).indices
        return None, pre, index, torch.relu(sparse_ops.pre_at(x, sae.W_enc, bias, pre, index))
    pre = x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)
    if sae.architecture == "jumprelu":
        return _JumpReLU.apply(pre, sae.threshold.to(pre.dtype), bandwidth), pre, None, None
    if sae.architecture == "batchtopk":
        if inference:  # the threshold, as at inference
            return torch.relu(pre) * (pre > sae.threshold), pre, None, None
        flat = torch.relu(pre).reshape(-1)
        values, index = flat.topk(min(sae.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(-1, index, values).view_as(pre), pre, None, None
    if sae.architecture == "topk":
        values, index = pre.topk(sae.k, dim=-1, sorted=False)
        values = torch.relu(values)
        return torch.zeros_like(pre).scatter(-1, index, values), pre, index, values
    return torch.relu(pre), pre, None, None


def token_losses(sae: SAE, x: torch.Tensor, l1: float, l0: float = 0.0, bandwidth: float = 0.05,
                 inference: bool = False, sparse: bool = False, pre_out: torch.Tensor | None = None):
    """Per-token loss and mse, the residual, and encode_train's outputs (`sparse`: sparse.use_sparse)."""
    f, pre, index, values = encode_train(sae, x, bandwidth, inference, sparse, pre_out)
    x_hat = (sparse_ops.decode(index, values, sae.W_dec) if sparse else f @ sae.W_dec) + sae.b_dec
    err = x_hat.float() - x.float()
    mse = err.pow(2).mean(-1)
    loss = mse
    if l1 > 0:
        loss = mse + l1 * (f.float() * sae.W_dec.norm(dim=1)).sum(-1)
    if l0 > 0 and sae.architecture == "jumprelu":
        loss = loss + l0 * _Step.apply(pre, sae.threshold.to(pre.dtype), bandwidth).float().sum(-1)
    return loss, mse, err, (f, pre, index, values)


def active(sae: SAE, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token L0, how many tokens of the batch each latent fired on, as float32)."""
    f, _, index, values = enc
    if index is None:
        on = f > 0
        return on.sum(-1), on.sum(0, dtype=torch.float32)
    on = values > 0
    counts = torch.zeros(sae.d_sae, dtype=torch.float32, device=values.device)
    counts.index_add_(0, index.reshape(-1), on.reshape(-1).float())
    return on.sum(-1), counts


def auxk_loss(sae: SAE, err: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int,
              dp: DataParallel | None = None, n_global: int | None = None, x: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Reconstruct the residual from the top `aux_k` dead latents (normalised by the residual's variance).
    Live latents are masked to -1 and clamped to 0 after the top-k, so when fewer than aux_k are dead
    the extra picks add nothing (no need to count the dead ones on the host).  With `dp`, this rank's
    share of the global-batch loss (mean and variance over the global batch; the shares sum to it).
    With the inputs `x`, the sparse path (encode_train's `sparse`: `pre` carries no gradient; live
    latents are masked to -inf and their picks multiplied by 0)."""
    if x is None:
        masked = torch.relu(pre).masked_fill(~dead[None, :], -1.0)
        values, index = masked.topk(min(aux_k, sae.d_sae), dim=-1, sorted=False)
        recon = torch.zeros_like(pre).scatter(-1, index, values.clamp_min(0)) @ sae.W_dec
    else:
        index = pre.masked_fill(~dead[None, :], -torch.inf).topk(min(aux_k, sae.d_sae), dim=-1, sorted=False).indices
        bias = sae.b_enc - sae.b_dec @ sae.W_enc
        values = torch.relu(sparse_ops.pre_at(x, sae.W_enc, bias, pre, index)) * dead[index]
        recon = sparse_ops.decode(index, values, sae.W_dec)
    residual = -err.detach()
    if dp is None or not dp.active:
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (recon.float() - residual).pow(2).sum(-1).mean() / denom
    mean = dp.all_reduce(residual.sum(0)) / n_global
    denom = dp.all_reduce((residual - mean).pow(2).sum().reshape(1))[0] / n_global
    return (recon.float() - residual).pow(2).sum() / n_global / denom.clamp_min(1e-12)


def batch_tilt(cfg: FitConfig, losses: torch.Tensor) -> float | torch.Tensor:
    """The t of this batch: --tilt, or solved for --tilt-ess (a 0-d tensor on the device)."""
    if cfg.tilt_ess is not None and cfg.tilt_ess < 1:
        return solve_tilt(losses, cfg.tilt_ess)
    return cfg.tilt


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, cfg: FitConfig, batch: int = 1024) -> dict:
    """Validation metrics on normalised rows."""
    sparse = sparse_ops.use_sparse(cfg.decoder, sae.architecture, sae.k, sae.d_sae, x.device.type)
    losses, mses, l0s = [], [], []
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    for s in range(0, len(x), batch):
        loss, mse, _, enc = token_losses(sae, x[s:s + batch], cfg.l1, cfg.l0 or 0.0, cfg.bandwidth, inference=True,
                                          sparse=sparse)
        l0, fired_now = active(sae, enc)
        losses.append(loss)
        mses.append(mse)
        l0s.append(l0.float())
        fired |= fired_now > 0
    loss, mse, l0 = torch.cat(losses), torch.cat(mses), torch.cat(l0s)
    var = (x - x.mean(0)).pow(2).mean(-1).sum()
    return {"val_loss": float(loss.mean()), "val_tilted_loss": float(tilted_loss(loss, batch_tilt(cfg, loss))),
            "val_mse": float(mse.mean()), "val_max_mse": float(mse.max()),
            "val_fvu": float(mse.sum() / var.clamp_min(1e-12)), "val_l0": float(l0.mean()),
            "val_unfired_fraction": float(1 - fired.float().mean())}


class Trainer:
    """One training run; `run(stop)` trains from `self.step` to the budget, checkpointing."""

    def __init__(self, cfg: FitConfig, sae: SAE, stream: ActivationStream, folder: str, val: np.ndarray,
                 dp: DataParallel | None = None):
        self.dp = dp or DataParallel()
        self.device = torch.device(self.dp.device(cfg.device))
        self.cfg, self.sae, self.stream, self.folder = cfg, sae.to(self.device), stream, folder
        self.opt = Adam(self.sae.parameters())
        self.step = 0
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=self.device)
        self.acc_n, self.acc = 0, torch.zeros(len(ACC), dtype=torch.float64, device=self.device)
        self.val = torch.from_numpy(val).to(self.device) * sae.act_scale if len(val) else None
        self.last_val: dict = {}
        self.log_path = os.path.join(folder, LOG)
        self.sparse = sparse_ops.use_sparse(cfg.decoder, sae.architecture, sae.k, sae.d_sae, self.device.type)
        self.pre_out: torch.Tensor | None = None  # the sparse step's pre-activations, reused (encode_train)

    def _fold_acc(self) -> None:
        """Sum the ranks' local accumulators into rank 0's (so its checkpoint holds the job's)."""
        if self.dp.active:
            local = self.dp.all_reduce(self.acc[len(ACC_GLOBAL):].clone())
            self.acc[len(ACC_GLOBAL):] = local if self.dp.is_main else 0

    # checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "model": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
                "act_scale": self.sae.act_scale, "optimizer": self.opt.state_dict(),
                "since_fired": self.since_fired.cpu(), "acc_n": self.acc_n, "acc": self.acc.cpu(),
                "last_val": self.last_val, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def save_checkpoint(self) -> None:
        self._fold_acc()  # every rank takes part
        if self.dp.is_main:
            path = os.path.join(self.folder, CHECKPOINT)
            torch.save(self.state(), path + ".tmp")
            os.replace(path + ".tmp", path)
            log.debug("checkpoint at step %d", self.step)
        # no rank leaves before the file is written: when one exits, torchrun stops the others
        self.dp.barrier()

    def read_checkpoint(self) -> dict:
        return torch.load(os.path.join(self.folder, CHECKPOINT), map_location="cpu", weights_only=False)

    def load_state(self, st: dict) -> None:
        self.sae.load_state_dict(st["model"])
        self.sae.act_scale = float(st["act_scale"])
        self.opt.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        self.since_fired = st["since_fired"].to(self.device)
        self.acc_n, self.acc = int(st["acc_n"]), st["acc"].to(self.device)
        if not self.dp.is_main:
            self.acc[len(ACC_GLOBAL):] = 0  # rank 0's checkpoint holds the job's sums
        self.last_val = st["last_val"]
        torch.set_rng_state(st["torch_rng"])
        if st.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        if self.dp.is_main:
            self._truncate_log()

    def load_checkpoint(self) -> None:
        self.load_state(self.read_checkpoint())

    def _truncate_log(self) -> None:
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        with open(self.log_path, "w") as f:
            f.writelines(keep)

    # training ------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        """One step on `x`, this rank's slice of the global batch (all of it in one process), with the
        global batch's `token_ids` for --tilt-groups token.  Nothing is read back to the host here,
        except dead.any() when AuxK is on."""
        cfg, sae, dp = self.cfg, self.sae, self.dp
        lr, l1 = lr_at(cfg, self.step), (l1_at(cfg, self.step) if sae.architecture == "relu" else 0.0)
        use_aux = sae.architecture in ("topk", "batchtopk") and cfg.aux_k > 0
        l0 = (cfg.l0 or 0.0) if sae.architecture == "jumprelu" else 0.0
        dead = self.since_fired >= cfg.dead_tokens
        autocast = cfg.autocast and self.device.type == "cuda"
        pre_out = None
        if self.sparse and not autocast:  # (autocast computes pre in bfloat16, into a tensor of its own)
            if self.pre_out is None or self.pre_out.shape[0] != len(x):
                self.pre_out = torch.empty(len(x), sae.d_sae, device=self.device)
            pre_out = self.pre_out
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, mse, err, enc = token_losses(sae, x, l1, l0, cfg.bandwidth, sparse=self.sparse, pre_out=pre_out)
            losses = dp.gather(loss.float(), cfg.batch_size)  # the global batch's per-token losses
            if cfg.tilt_groups == "token":
                losses = group_means(losses, token_ids)  # each token's type's mean loss in the batch
            tilt = batch_tilt(cfg, losses)
            objective = tilted_loss(losses, tilt)
            aux = (auxk_loss(sae, err, enc[1], dead, cfg.aux_k, dp, cfg.batch_size, x if self.sparse else None)
                   if use_aux and bool(dead.any()) else None)
            total = objective + cfg.aux_coefficient * aux if aux is not None else objective
        self.opt.zero_grad()
        total.backward()
        with torch.no_grad():
            l0, fired = active(sae, enc)
            if dp.active:  # one all-reduce: the gradients and the firing counts, summed over ranks
                params = self.opt.params
                flat = dp.all_reduce(torch.cat([p.grad.reshape(-1) for p in params] + [fired]))
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                fired = flat[offset:]
            W, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * W).sum(1, keepdim=True) * W)  # rows are unit norm
        self.opt.step(lr)
        sae.normalize_decoder()
        if sae.architecture == "jumprelu":
            sae.threshold.data.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations
        elif sae.architecture == "batchtopk":
            with torch.no_grad():
                f = enc[0].detach().float()
                smallest = dp.all_min(torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().reshape(1))[0]
                moved = sae.threshold.lerp(smallest.expand_as(sae.threshold), BATCHTOPK_THRESHOLD_RATE)
                sae.threshold.copy_(torch.where(torch.isfinite(smallest), moved, sae.threshold))
        with torch.no_grad():
            self.since_fired += cfg.batch_size
            self.since_fired.masked_fill_(fired > 0, 0)
            if cfg.tilted:
                w = tilt_weights(losses, tilt)
                ess, top = 1.0 / (w.pow(2).sum() * w.numel()), w.max() * w.numel()
            else:
                ess = top = objective.new_ones(())
            zero = objective.new_zeros(())
            t = tilt.float() if isinstance(tilt, torch.Tensor) else objective.new_tensor(float(tilt))
            self.acc += torch.stack([objective.detach().float(), t, ess.float(), top.float(), loss.detach().float().sum(),
                                     mse.detach().float().sum(), l0.float().sum(),
                                     aux.detach().float() if aux is not None else zero]).double()
            self.acc_n += 1
        self.step += 1

    def log_record(self, with_val: bool) -> dict | None:
        """Every rank takes part (the sums are reduced); rank 0 validates, writes and returns the record."""
        cfg = self.cfg
        self._fold_acc()
        if not self.dp.is_main:
            self.acc_n, self.acc = 0, torch.zeros_like(self.acc)
            return None
        a = dict(zip(ACC, self.acc.tolist()))
        n = max(self.acc_n, 1)
        tokens = n * cfg.batch_size
        rec = {"step": self.step, "tokens": self.step * cfg.batch_size,
               "loss": a["objective"] / n, "erm_loss": a["loss"] / tokens, "mse": a["mse"] / tokens,
               "l0": a["l0"] / tokens,
               "dead_fraction": float((self.since_fired >= cfg.dead_tokens).float().mean()),
               "lr": lr_at(cfg, self.step - 1), "l1": l1_at(cfg, self.step - 1) if cfg.architecture == "relu" else 0.0,
               "tilt": a["tilt"] / n, "tilt_ess_fraction": a["ess_fraction"] / n,
               "tilt_max_weight_x_n": a["max_weight_x_n"] / n}
        if cfg.architecture in ("topk", "batchtopk") and cfg.aux_k:
            rec["aux_loss"] = a["aux"] / n
        if with_val and self.val is not None:
            self.last_val = evaluate(self.sae, self.val, cfg)
            rec.update(self.last_val)
        self.acc_n, self.acc = 0, torch.zeros_like(self.acc)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def run(self, stop: StopFlag, quiet: bool = False) -> None:
        """Train from `self.step` to the budget (train_together, alone)."""
        train_together([self], stop, quiet)


class Batches:
    """Each step's batch on the device: this rank's rows of the global batch and (for --tilt-groups token)
    the global batch's token ids, built once for every SAE trained on it.  With `prefetch`, the next
    step's batch is built on the host in a background thread while the current step trains (on CUDA in
    pinned memory, so that its copy to the device is asynchronous).  The batches are the stream's, in its
    order, prefetch or not."""

    def __init__(self, stream: ActivationStream, rows: tuple[int, int], device: torch.device, prefetch: bool,
                 steps: int):
        self.stream, self.rows, self.device, self.steps = stream, rows, device, steps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssae-batch") if prefetch else None
        self._next: tuple[int, Future] | None = None

    def _host(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = None
        if self.stream.tokens:  # every rank keeps the global batch's ids (the tilt is global)
            rows, ids = self.stream.batch_with_tokens(step)
            ids = torch.from_numpy(ids)
        else:
            rows = self.stream.batch(step)
        lo, hi = self.rows
        rows = torch.from_numpy(rows[lo:hi])
        if self.device.type == "cuda":  # an asynchronous copy (from pageable memory it would wait for the GPU)
            rows, ids = rows.pin_memory(), (ids.pin_memory() if ids is not None else None)
        return rows, ids

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == step:
            rows, ids = ahead[1].result()
        else:
            if ahead is not None:  # the stream builds one batch at a time
                _settle(ahead[1])
            rows, ids = self._host(step)
        if self._pool is not None and step + 1 < self.steps:
            self._next = (step + 1, self._pool.submit(self._host, step + 1))
        return (rows.to(self.device, non_blocking=True),
                ids.to(self.device, non_blocking=True) if ids is not None else None)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        if self._next is not None:
            _settle(self._next[1])
            self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _settle(future: Future) -> None:
    """Wait for a batch no longer wanted (an error in it is for the step that would have used it)."""
    with contextlib.suppress(BaseException):
        future.result()


def train_together(trainers: list[Trainer], stop: StopFlag, quiet: bool = False) -> None:
    """Train `trainers`, SAEs on one stream with one budget, to the end: each step's batch is built once
    (Batches), then every trainer at that step takes its step on it, in order.  A trainer resumed at a
    later step than the others waits for them.  Each checkpoints as its config says; a stop saves all."""
    first = trainers[0]
    threads = torch.get_num_threads()
    if first.device.type == "cpu" and all(
            t.cfg.batch_size * t.sae.d_in * t.sae.d_sae < SMALL_STEP for t in trainers):
        torch.set_num_threads(1)  # tiny matmuls: thread start-up and spinning cost more than they give
    try:
        _train_together(trainers, stop, quiet)
    finally:
        torch.set_num_threads(threads)


def _train_together(trainers: list[Trainer], stop: StopFlag, quiet: bool) -> None:
    first = trainers[0]
    cfg, dp = first.cfg, first.dp
    total, batch = cfg.steps, cfg.batch_size
    with Batches(first.stream, dp.bounds(batch), first.device, cfg.prefetch, total) as batches, \
            Progress("fit", total=total * batch * len(trainers), unit="tokens",
                     quiet=quiet or not dp.is_main) as progress:
        progress.done = sum(t.step for t in trainers) * batch
        while any(t.step < total for t in trainers):
            step = min(t.step for t in trainers)
            rows, ids = batches.get(step)
            for t in trainers:
                if t.step != step:
                    continue
                t.train_step(rows * t.sae.act_scale, ids)
                last = t.step == total
                val_now = t.step % t.cfg.val_every == 0 or last
                if t.step % t.cfg.log_every == 0 or val_now:
                    rec = t.log_record(val_now)
                    if rec is not None:
                        progress.update(0, loss=f"{rec['loss']:.4g}", mse=f"{rec['mse']:.4g}", l0=f"{rec['l0']:.1f}")
                progress.update(batch)
                if t.step % t.cfg.checkpoint_every == 0 and not last:
                    t.save_checkpoint()
            if any(t.step < total for t in trainers):
                _check_stop(stop, trainers)


def _check_stop(stop, trainers: list[Trainer]) -> None:
    """On a stop request (on any rank): every trainer saves its checkpoint, then Interrupted."""
    def save() -> None:
        for t in trainers:
            t.save_checkpoint()

    dp = trainers[0].dp
    if not dp.active:
        stop.check(save)
        return
    mine = bool(getattr(stop, "requested", False))
    if dp.any(mine):  # every rank stops at the same step, so the checkpoint's collectives match
        if mine:
            stop.check(save)
        save()
        raise Interrupted("interrupted (another rank received the signal); checkpoint saved, rerun the same "
                          "command to resume")


# --- the whole fit --------------------------------------------------------------------------------
@dataclass
class Parent:
    path: str
    format: str
    sha256: str
    sae: SAE = field(repr=False)

    def record(self) -> dict:
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "format": self.format}


@dataclass
class Run:
    """One SAE to train: its resolved config, its output folder, the resolved configuration and its hash
    (which identify a checkpoint to resume), what else goes into its cfg.json, and its parent."""
    cfg: FitConfig
    out: str
    resolved: dict
    digest: str
    extra_cfg: dict
    parent: Parent | None = None


# what the SAEs trained on one stream must share (they may differ in the rest: tilt, tilt_ess, k, ...)
SHARED = ("seed", "batch_size", "train_tokens", "shuffle_rows", "val_tokens", "tilt_groups", "device", "prefetch")


def refuse_sweep_under_torchrun(n_saes: int) -> None:
    """Several SAEs in one call train in one process: a torchrun job (WORLD_SIZE > 1) is refused."""
    if n_saes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInput(f"a sweep of {n_saes} SAEs under torchrun is not supported: run one ssae-fit per SAE")


def train_sae(paths: list[str], cfg: FitConfig, out: str, *, parent: Parent | None = None, resolved: dict,
              config_digest: str, extra_cfg: dict, force: bool = False, quiet: bool = False,
              stop: StopFlag | None = None) -> str | None:
    """Train into the SAE directory `out` (atomic; resumable from the partial folder beside it) with a
    resolved `cfg` (FitConfig.resolve).  Returns `out`, or None on the ranks other than 0 of a torchrun
    job.  `resolved` and `config_digest` identify the configuration of a checkpoint to resume;
    `extra_cfg` goes into cfg.json."""
    return train_saes(paths, [Run(cfg, out, resolved, config_digest, extra_cfg, parent)], force=force, quiet=quiet,
                      stop=stop)[0]


def train_saes(paths: list[str], runs: list[Run], *, force: bool = False, quiet: bool = False,
               stop: StopFlag | None = None) -> list[str | None]:
    """Train every run as train_sae would, the runs of one seed together from one stream: each step's
    batch is read and built once, then each SAE takes its step (train_together).  Every output is
    checked before any training.  Returns the outputs, in order (None on the ranks other than 0)."""
    from ..data.activations import open_stores

    refuse_sweep_under_torchrun(len(runs))
    groups: dict[int, list[Run]] = {}
    for run in runs:
        if not run.cfg.is_resolved:
            raise ValueError("train_saes needs resolved FitConfigs (FitConfig.resolve)")
        run.cfg.check()
        groups.setdefault(run.cfg.seed, []).append(run)
    for group in groups.values():
        differ = [f for f in SHARED if len({getattr(r.cfg, f) for r in group}) > 1]
        if differ:
            raise ValueError(f"SAEs trained together must share {', '.join(differ)}")
    stores = open_stores(paths)
    try:
        # one writer per output: a second fit of the same OUT must not train on (and resume) the live partial;
        # under torchrun rank 0 writes, so it alone holds the lock
        with contextlib.ExitStack() as locks:
            if int(os.environ.get("RANK", "0")) == 0:
                for run in runs:
                    locks.enter_context(exclusive(run.out))
            for run in runs:
                check_target(run.out, force)
            written = {}
            for group in groups.values():
                written.update(zip(map(id, group), _fit(stores, group, force, quiet, stop)))
            return [written[id(run)] for run in runs]
    finally:
        for s in stores:
            s.close()


def _fit(stores: list[ActivationStore], runs: list[Run], force: bool, quiet: bool, stop) -> list[str | None]:
    cfg = runs[0].cfg
    d_in = stores[0].d_model
    for run in runs:
        if run.parent is not None and run.parent.sae.d_in != d_in:
            raise ConfigError("init", run.parent.path, f"d_in {run.parent.sae.d_in} differs from the activations' "
                                                       f"d_model {d_in} ({stores[0].path})")
    dp = data_parallel(cfg.device)
    if cfg.batch_size < dp.world:
        raise ConfigError("batch_size", cfg.batch_size, f"smaller than the number of ranks ({dp.world})")
    stream = ActivationStream(stores, cfg.batch_size, cfg.seed, shuffle_rows=cfg.shuffle_rows, val_rows=cfg.val_tokens,
                              tokens=cfg.tilt_groups == "token")
    created, trainers = [], []
    try:
        val = sample = None  # read once for every SAE of the stream
        for run in runs:
            folder = partial_path(run.out)
            # rank 0 decides whether to resume, reads the checkpoint or initialises, and hands the result to
            # the other ranks (a bad input found there fails every rank with the same message)
            start, error = None, None
            if dp.is_main:
                try:
                    resume = _resume_or_clear(folder, run.digest, force)
                    val = stream.validation() if val is None else val
                    if resume:
                        log.info("resuming %s", folder)
                        sae = SAE(d_in, run.cfg.d_sae, run.cfg.architecture, run.cfg.k)
                        trainer = Trainer(run.cfg, sae, stream, folder, np.empty((0, d_in), np.float32), dp)
                        state = trainer.read_checkpoint()
                        trainer.load_state(state)
                        trainer.val = (torch.from_numpy(val).to(trainer.device) * trainer.sae.act_scale
                                       if len(val) else None)
                        start = {"resume": state} if dp.active else None
                    else:
                        sample = stream.sample(min(32768, stream.n_train)) if sample is None else sample
                        # each SAE finetunes its own copy of the parent (init_sae changes it in place)
                        parent = copy.deepcopy(run.parent.sae) if run.parent is not None else None
                        sae = init_sae(run.cfg, d_in, sample, parent)
                        os.makedirs(folder)
                        created.append(folder)
                        with open(os.path.join(folder, STATE), "w") as f:
                            json.dump({"config_hash": run.digest, "config": run.resolved}, f, indent=2, default=str)
                        trainer = Trainer(run.cfg, sae, stream, folder, val, dp)
                        if dp.active:
                            start = {"init": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
                                     "act_scale": sae.act_scale}
                except BadInput as e:
                    if not dp.active:
                        raise
                    error = e
            if dp.active:
                start = dp.broadcast({"error": str(error)} if error is not None else start)
                if error is not None:
                    raise error
                if "error" in start:
                    raise BadInput(start["error"])
                if not dp.is_main:
                    sae = SAE(d_in, run.cfg.d_sae, run.cfg.architecture, run.cfg.k)
                    trainer = Trainer(run.cfg, sae, stream, folder, np.empty((0, d_in), np.float32), dp)
                    if "resume" in start:
                        trainer.load_state(start["resume"])
                    else:
                        trainer.sae.load_state_dict(start["init"])
                        trainer.sae.act_scale = float(start["act_scale"])
                del start
            trainers.append(trainer)
        del val, sample
        started = time.monotonic()
        if stop is None:
            with StopFlag() as flag:
                train_together(trainers, flag, quiet)
        else:
            train_together(trainers, stop, quiet)
        elapsed = time.monotonic() - started
    except BadInput:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        stream.close()
    if not dp.is_main:
        dp.barrier()  # wait for rank 0's output, so the job ends when it is written
        return [None]
    return [_write(run, trainer, stream, elapsed, dp, force) for run, trainer in zip(runs, trainers)]


def _write(run: Run, trainer: Trainer, stream: ActivationStream, elapsed: float, dp: DataParallel,
           force: bool) -> str:
    """Write a trained SAE's folder from its trainer; its partial folder goes."""
    cfg, out = run.cfg, run.out
    summary = {"steps": trainer.step, "tokens": trainer.step * cfg.batch_size, "train_rows": stream.n_train,
               "val_rows": stream.val_size, **trainer.last_val,
               "dead_fraction": float((trainer.since_fired >= cfg.dead_tokens).float().mean()),
               "seconds_last_run": round(elapsed, 2)}
    if dp.active:
        summary["ranks"] = dp.world
    sae = trainer.sae.cpu()
    try:
        with atomic_dir(out, force) as tmp:
            sae.save(tmp, **run.extra_cfg, training=summary)
            shutil.copy(os.path.join(trainer.folder, LOG), os.path.join(tmp, LOG))
        shutil.rmtree(trainer.folder, ignore_errors=True)
    finally:
        dp.barrier()
    log.info("wrote %s: %d steps, %d tokens%s", out, trainer.step, trainer.step * cfg.batch_size,
             f", val fvu {trainer.last_val['val_fvu']:.4f}" if "val_fvu" in trainer.last_val else "")
    return out


def _resume_or_clear(folder: str, digest: str, force: bool) -> bool:
    """True when `folder` holds a checkpoint of this configuration (resumed even under --force: the
    result is the same as a fresh run's); otherwise clears it, or refuses without --force."""
    if not os.path.isdir(folder):
        return False
    state = _read_state(folder)
    if state.get("config_hash") == digest and os.path.exists(os.path.join(folder, CHECKPOINT)):
        return True
    if not force and state.get("config_hash") != digest:
        raise BadInput(f"{folder}: an interrupted fit with a different configuration is there "
                       "(use --force to start over)")
    shutil.rmtree(folder)
    return False


def _read_state(folder: str) -> dict:
    try:
        with open(os.path.join(folder, STATE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def parent_sha256(path: str) -> str:
    from .imports import parent_files

    files = parent_files(path)
    if len(files) == 1:
        return sha256_file(files[0])
    return sha256_file(path)
