"""The training loop: a Trainer per SAE (its step, its checkpoints, its log records), the batches of a stream
built once for every SAE trained on it (Batches, prefetched), and train_together, which steps SAEs that share
a stream.  Each step: the objective (objective.py) is back-propagated, the gradient component along each
decoder row is removed, the gradient is scaled to unit norm (normalize_grad), Adam steps, the decoder rows
are renormalised, and the architecture's per-step hook runs (architectures/: a threshold kept >= 0, or
following the batch).  Batches come from `ActivationStream`, a pure function of (seed, step), so a checkpoint
(weights, Adam state, counters, RNG states, the step) resumes exactly.  The t used is logged (its mean over
the steps since the last record) with the weights' ESS fraction."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..data.batches import ActivationStream
from ..core.errors import BadInput, Interrupted
from ..core.progress import Progress
from ..core.records import to_json
from ..core.signals import StopFlag
from . import sparse as sparse_ops
from .autoencoder import SAE
from .config import FitConfig
from .distributed import DataParallel
from .objective import active, auxk_loss, batch_tilt, token_losses, validation_metrics
from .optim import Adam, lr_at
from .term import group_means, tilted_loss, tilt_weights

log = logging.getLogger("ssae")
CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
SMALL_STEP = 10**8  # batch x d_in x d_sae below which CPU training runs on one thread
# per-step statistics accumulated on the device between log records (read back only when logging)
ACC_GLOBAL = ("objective", "tilt", "ess_fraction", "max_weight_x_n")  # same value on every rank
ACC_LOCAL = ("loss", "mse", "l0", "aux")  # sums over this rank's tokens (aux: this rank's share)
ACC = ACC_GLOBAL + ACC_LOCAL


def save_checkpoint(state: dict, path: str) -> None:
    """Write a checkpoint atomically: a new file (never through a link planted at a fixed name) renamed
    into place; a full disk leaves the previous checkpoint and says so in one line."""
    import tempfile

    from ..core.outputs import is_full_disk, no_space

    fd, tmp = tempfile.mkstemp(prefix=CHECKPOINT + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, Exception) and (is_full_disk(e) or is_full_disk(e.__cause__ or e.__context__ or e)):
            raise no_space(os.path.dirname(path)) from None
        raise


def read_checkpoint(path: str) -> dict:
    """A checkpoint's tensors and numbers; never code (torch.load with weights_only: a pickle that names
    anything but tensors, containers and numbers is refused), and never through a symbolic link."""
    import pickle

    from ..core.outputs import open_partial

    f = open_partial(path)
    if f is None:
        raise BadInput(f"{path}: not a regular file (a link, or missing)")
    with f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise BadInput(f"{path}: not a checkpoint ssae wrote ({type(e).__name__}: {first})") from None


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
            save_checkpoint(self.state(), os.path.join(self.folder, CHECKPOINT))
            log.debug("checkpoint at step %d", self.step)
        # no rank leaves before the file is written: when one exits, torchrun stops the others
        self.dp.barrier()

    def read_checkpoint(self) -> dict:
        return read_checkpoint(os.path.join(self.folder, CHECKPOINT))

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
        cfg, sae, dp, arch = self.cfg, self.sae, self.dp, self.sae.arch
        lr, coefficient = lr_at(cfg, self.step), arch.coefficient(cfg, self.step)
        use_aux = arch.auxk and cfg.aux_k > 0
        dead = self.since_fired >= cfg.dead_tokens
        autocast = cfg.autocast and self.device.type == "cuda"
        pre_out = None
        if self.sparse and not autocast:  # (autocast computes pre in bfloat16, into a tensor of its own)
            if self.pre_out is None or self.pre_out.shape[0] != len(x):
                self.pre_out = torch.empty(len(x), sae.d_sae, device=self.device)
            pre_out = self.pre_out
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, mse, err, enc = token_losses(sae, x, coefficient, cfg.bandwidth, sparse=self.sparse, pre_out=pre_out)
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
            if cfg.normalize_grad:
                grads = [p.grad for p in self.opt.params if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in grads])).clamp_min(1e-30)
                for p in grads:
                    p.div_(norm)
        self.opt.step(lr)
        sae.normalize_decoder()
        arch.after_step(sae, enc, dp)
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
        cfg, arch = self.cfg, self.sae.arch
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
               "lr": lr_at(cfg, self.step - 1), "l1": arch.coefficient(cfg, self.step - 1) if arch.penalty == "l1" else 0.0,
               "tilt": a["tilt"] / n, "tilt_ess_fraction": a["ess_fraction"] / n,
               "tilt_max_weight_x_n": a["max_weight_x_n"] / n}
        if arch.auxk and cfg.aux_k:
            rec["aux_loss"] = a["aux"] / n
        if with_val and self.val is not None:
            self.last_val = validation_metrics(self.sae, self.val, cfg)
            rec.update(self.last_val)
        self.acc_n, self.acc = 0, torch.zeros_like(self.acc)
        with open(self.log_path, "a") as f:
            f.write(to_json(rec) + "\n")
        return rec


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
