"""Training SAEs with ERM or tilted ERM, from scratch or finetuned from a parent SAE (GSAE -> SSAE): the fit
driver.  It checks every output, opens the activation stores once, initialises each SAE (or resumes it from
the checkpoint in its partial folder), trains the SAEs of one stream together (trainer.train_together) and
writes each SAE's folder.  The objective is in objective.py, Adam and the schedules in optim.py, torchrun in
distributed.py, the training loop in trainer.py."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.activations import ActivationStore
from ..data.batches import ActivationStream
from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.outputs import atomic_dir, check_target, exclusive, partial_path, refuse_link, sha256_file
from ..core.records import dump_json
from ..core.signals import StopFlag
from .autoencoder import SAE
from .config import FitConfig
from .distributed import DataParallel, data_parallel
from .architectures import get as architecture
from .trainer import CHECKPOINT, LOG, Trainer, read_checkpoint, train_together

log = logging.getLogger("ssae")
STATE = "partial.json"


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
    sae.arch.rescale(sae, norms)  # the pre-activations scale with the norms
    return change


def new_sae(cfg: FitConfig, d_in: int, act_scale: float = 1.0) -> SAE:
    """An SAE of cfg's architecture and shape, its weights zero."""
    return SAE(d_in, cfg.d_sae, cfg.architecture, cfg.k, act_scale, architecture(cfg.architecture).group_sizes_of(cfg))


def init_sae(cfg: FitConfig, d_in: int, sample: np.ndarray, parent: SAE | None) -> SAE:
    gen = torch.Generator().manual_seed(cfg.seed)
    if parent is not None:
        sae = parent  # keeps the parent's act_scale: its weights expect inputs on that scale
        sae.cfg = {}
        change = unit_norm_decoder(sae)
        if change > 1e-3:
            log.warning("--init: parent decoder rows were not unit norm (up to %.3g off); renormalised%s", change,
                        " (TopK selection may change slightly)" if "k" in sae.arch.options else "")
    else:
        sae = new_sae(cfg, d_in, act_scale_of(sample) if cfg.normalize else 1.0)
        with torch.no_grad():
            w = torch.randn(cfg.d_sae, d_in, generator=gen)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.zero_()
            sae.arch.init_weights(sae)
    x = torch.from_numpy(sample) * sae.act_scale
    with torch.no_grad():
        if cfg.b_dec_init == "median":
            sae.b_dec.copy_(geometric_median(x))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(x.mean(0))
        elif cfg.b_dec_init == "zero":
            sae.b_dec.zero_()
    return sae


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
            if stop is None:
                stop = locks.enter_context(StopFlag())
            for group in groups.values():
                if written:
                    stop.check()  # between two seeds: the finished SAEs are written, a rerun trains the rest
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
                    state = _checkpoint_or_clear(folder) if resume else None
                    val = stream.validation() if val is None else val
                    if state is not None:
                        log.info("resuming %s", folder)
                        sae = new_sae(run.cfg, d_in)
                        trainer = Trainer(run.cfg, sae, stream, folder, np.empty((0, d_in), np.float32), dp)
                        trainer.load_state(state)
                        trainer.val = (torch.from_numpy(val).to(trainer.device) * trainer.sae.act_scale
                                       if len(val) else None)
                        start = {"resume": state} if dp.active else None
                    else:
                        sample = stream.sample(min(32768, stream.n_train)) if sample is None else sample
                        # each SAE finetunes its own copy of the parent (init_sae changes it in place)
                        parent = copy.deepcopy(run.parent.sae) if run.parent is not None else None
                        sae = init_sae(run.cfg, d_in, sample, parent)
                        os.makedirs(folder, mode=0o700)  # private while in progress: nothing planted inside
                        created.append(folder)
                        with open(os.path.join(folder, STATE), "w") as f:
                            dump_json({"config_hash": run.digest, "config": run.resolved}, f, indent=2, default=str)
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
                    sae = new_sae(run.cfg, d_in)
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


def _checkpoint_or_clear(folder: str) -> dict | None:
    """The checkpoint in `folder`, or None (and the folder cleared) when it is not one ssae wrote."""
    try:
        return read_checkpoint(os.path.join(folder, CHECKPOINT))
    except BadInput as e:
        log.warning("%s: starting over", e)
        shutil.rmtree(folder)
        return None


def _resume_or_clear(folder: str, digest: str, force: bool) -> bool:
    """True when `folder` holds a checkpoint of this configuration (resumed even under --force: the
    result is the same as a fresh run's); otherwise clears it, or refuses without --force."""
    refuse_link(folder)
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
