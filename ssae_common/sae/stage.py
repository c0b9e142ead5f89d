"""The fit stage from Python: activations -> a sparse autoencoder (`ssae.sae/1` directory), by ERM or
tilted ERM, from scratch or finetuned from a parent SAE (`FitConfig.init`).

    from ssae_common.core.runtime import RunContext
    from ssae_common.sae import FitConfig, fit
    record = fit(FitConfig(k=4, d_sae=64, tilt=500), ["acts.h5"], out="sae", context=RunContext(device_spec="cpu"))

Under torchrun the same call trains data-parallel (sae.train.DataParallel); rank 0 writes the output.
"""
from __future__ import annotations

import logging
import os

from ..core.config import ConfigError, replace, to_dict
from ..core.outputs import default_output, existing_output
from ..core.provenance import config_hash, created_by
from ..core.records import artifact_record
from ..core.runtime import RunContext
from .config import FitConfig

log = logging.getLogger("ssae")
MARKER = "cfg.json"  # present once an SAE folder is complete


def fit(config: FitConfig, activations: list[str], *, out: str | None = None,
        context: RunContext) -> dict | None:
    """Train an SAE on the activation stores `activations` (.h5 paths) into the folder `out` (default:
    under $SSAE_WORKDIR, named by a hash of the inputs and the resolved config, and reused when a complete
    one is there).  Returns the sae artifact record; None on the ranks other than 0 of a torchrun job."""
    from ..data.activations import open_stores, store_fingerprint
    from .imports import import_sae
    from .train import Parent, parent_sha256, train_sae

    config.check()
    stores = open_stores(activations)
    try:
        d_in, model, hook = stores[0].d_model, stores[0].model, stores[0].hook
        n_rows = sum(s.n_tokens for s in stores)
    finally:
        for s in stores:
            s.close()

    parent = None
    if config.init:
        sae, fmt = import_sae(config.init, config.init_format)
        if sae.d_in != d_in:
            raise ConfigError("init", config.init, f"d_in {sae.d_in} differs from the activations' d_model {d_in} "
                                                   f"({activations[0]})")
        _check_parent_source(sae, config, model, hook, activations[0])
        parent = Parent(config.init, fmt, parent_sha256(config.init), sae)
    cfg = replace(config.resolve(d_in, n_rows, parent.sae if parent else None),
                  seed=context.seed, device=context.device)

    inputs = [{"path": os.path.abspath(p), "fingerprint": store_fingerprint(p)} for p in activations]
    # --allow-init-mismatch permits, it does not change what is trained: kept out of the hash
    settings = {k: v for k, v in to_dict(cfg).items() if k != "allow_init_mismatch"}
    resolved = context.resolved(**{**settings, "init": parent.record() if parent else None}, inputs=inputs)
    digest = config_hash(resolved)
    if out is None:
        out, reuse = _default_output(digest, context.force)
        if reuse:
            return sae_artifact(out) if main_rank() else None
    extra = {"model": model, "hook": hook, "tilt": cfg.tilt, "tilt_ess": cfg.tilt_ess, "tilt_groups": cfg.tilt_groups,
             "l1_coefficient": cfg.l1, **({"l0_coefficient": cfg.l0} if cfg.architecture == "jumprelu" else {}),
             "parent": parent.record() if parent else None, "seed": context.seed, "inputs": inputs,
             "config": resolved, "created_by": created_by(context.program)}
    written = train_sae(activations, cfg, out, parent=parent, resolved=resolved, config_digest=digest,
                        extra_cfg=extra, force=context.force, quiet=context.quiet)
    return sae_artifact(written) if written is not None else None


def _check_parent_source(sae, config: FitConfig, model: str, hook: str, where: str) -> None:
    """Refuse to finetune a parent trained on another model or hook (same width is not the same space),
    unless told to (--allow-init-mismatch); a parent that records neither is taken as it is."""
    recorded = {"model": sae.cfg.get("model"), "hook": sae.cfg.get("hook")}
    wanted = {"model": model, "hook": hook}
    differ = [k for k in ("model", "hook") if recorded[k] and wanted[k] and recorded[k] != wanted[k]]
    if not differ:
        return
    what = " and ".join(f"{k} {recorded[k]!r}" for k in differ)
    theirs = " and ".join(f"{k} {wanted[k]!r}" for k in differ)
    if config.allow_init_mismatch:
        log.warning("--init %s was trained on %s, the activations %s are %s (allowed by --allow-init-mismatch)",
                    config.init, what, where, theirs)
        return
    raise ConfigError("init", config.init, f"the parent was trained on {what}, but {where} holds {theirs} "
                                           "(--allow-init-mismatch to finetune it anyway)")


def _default_output(digest: str, force: bool) -> tuple[str, bool]:
    """(path, reuse) of the default output; only rank 0 of a torchrun job logs the reuse."""
    if main_rank():
        return existing_output("sae", digest, marker=MARKER, force=force)
    path = default_output("sae", digest, "")
    return path, os.path.exists(os.path.join(path, MARKER)) and not force


def main_rank() -> bool:
    """False on the ranks of a torchrun job other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


def sae_artifact(path: str) -> dict:
    """The `ssae.artifact/1` record of the SAE folder `path`, its summary read from its cfg.json."""
    from .autoencoder import read_config

    cfg = read_config(path)
    training = cfg.get("training") or {}
    return artifact_record("sae", path, architecture=cfg.get("architecture"), d_in=cfg.get("d_in"),
                           d_sae=cfg.get("d_sae"), k=cfg.get("k"), tilt=cfg.get("tilt"),
                           tilt_ess=cfg.get("tilt_ess"), tilt_groups=cfg.get("tilt_groups"), model=cfg.get("model"),
                           hook=cfg.get("hook"), parent=cfg.get("parent"), tokens=training.get("tokens"),
                           val_fvu=training.get("val_fvu"))
