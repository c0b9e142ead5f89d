"""The fit stage from Python: activations -> a sparse autoencoder (`ssae.sae/1` directory), by ERM or
tilted ERM, from scratch or finetuned from a parent SAE (`FitConfig.init`).

    from ssae_common.core.runtime import RunContext
    from ssae_common.sae import FitConfig, fit
    record = fit(FitConfig(k=4, d_sae=64, tilt_ess=0.5), ["acts.h5"], out="sae", context=RunContext(device_spec="cpu"))

Several SAEs from one read of the data (a sweep; one record each):

    records = fit_sweep(FitConfig(k=4, d_sae=64), ["acts.h5"], sweep={"tilt": (0, 500), "seed": (0, 1)},
                        out="saes", context=RunContext(device_spec="cpu"))

Under torchrun the same call trains data-parallel (sae.distributed.DataParallel); rank 0 writes the output.
"""
from __future__ import annotations

import logging
import os
import re

from ..core.config import ConfigError, hashed_values, replace
from ..core.errors import BadInput
from ..core.outputs import default_output, existing_output
from ..core.provenance import config_hash, created_by
from ..core.records import artifact_record
from ..core.runtime import RunContext
from .architectures import get as get_architecture
from .config import SWEEPS, FitConfig

log = logging.getLogger("ssae")
MARKER = "cfg.json"  # present once an SAE folder is complete


def fit(config: FitConfig, activations: list[str], *, out: str | None = None,
        context: RunContext | None = None) -> dict | None:
    """Train an SAE on the activation stores `activations` (.h5 paths) into the folder `out` (default:
    under $SSAE_WORKDIR, named by a hash of the inputs and the resolved config, and reused when a complete
    one is there).  Returns the sae artifact record; None on the ranks other than 0 of a torchrun job."""
    records = fit_sweep(config, activations, out=out, context=context)
    return records[0] if records else None


def fit_sweep(config: FitConfig, activations: list[str], *, sweep: dict | None = None, out: str | None = None,
              context: RunContext | None = None) -> list[dict]:
    """Train one SAE per combination of `sweep`, {field: values} for the SWEEPS fields and "seed" (the
    cartesian product, in the order given; a field not in it keeps `config`'s value, the seed the
    context's).  Each SAE is the one `fit` with its options trains.  The SAEs of one seed share every
    batch: each step's batch is read and built once, then each SAE takes its step (train.train_saes).

    With one combination this is `fit`.  With several, `out` is the folder holding one SAE folder per
    combination, named by the fields with several values (tilt500-seed1), or a name template with
    {tilt}, {tilt_ess}, {k} and {seed} (runs/ssae-t{tilt}); without `out`, each goes where `fit` with its
    options would put it (a complete one there is reused).  Returns the artifact records (none on the
    ranks other than 0 of a torchrun job)."""
    from ..core.signals import StopFlag

    # one handler from the start: a signal at any moment (between two seeds too) checkpoints and exits 75
    with StopFlag() as stop:
        return _fit_sweep(config, activations, sweep, out, context, stop)


def _fit_sweep(config: FitConfig, activations: list[str], sweep: dict | None, out: str | None,
               context: RunContext, stop) -> list[dict]:
    from ..data.activations import open_stores, store_fingerprint
    from .imports import import_sae
    from .train import Parent, Run, parent_sha256, refuse_sweep_under_torchrun, train_saes

    context = context or RunContext()
    combos = _combinations(sweep or {}, context.seed)
    config.check()
    stores = open_stores(activations)
    try:
        d_in, model, hook = stores[0].d_model, stores[0].model, stores[0].hook
        # where and how the activations were taken, for the tools that rerun the model with this SAE
        source = {k: getattr(stores[0], k) for k in ("hook_module", "prepend_bos", "model_dtype")
                  if getattr(stores[0], k) is not None}
        n_rows = sum(s.n_tokens for s in stores)
    finally:
        for s in stores:
            s.close()
    refuse_sweep_under_torchrun(len(combos))  # before the parent is read

    parent = None
    if config.init:
        sae, fmt = import_sae(config.init, config.init_format)
        if sae.d_in != d_in:
            raise ConfigError("init", config.init, f"d_in {sae.d_in} differs from the activations' d_model {d_in} "
                                                   f"({activations[0]})")
        _check_parent_source(sae, config, model, hook, activations[0], source.get("prepend_bos"))
        parent = Parent(config.init, fmt, parent_sha256(config.init), sae)
    inputs = [{"path": os.path.abspath(p), "fingerprint": store_fingerprint(p)} for p in activations]

    varied = [f for f in combos[0] if len({c[f] for c in combos}) > 1]
    runs, records, kept = [], [], []
    for combo in combos:  # every combination is checked before any is trained
        seed = combo.pop("seed")
        ctx = replace(context, seed=seed)
        # autocast acts on CUDA only: record (and hash) what the run does
        cfg = replace(replace(config, **combo).resolve(d_in, n_rows, parent.sae if parent else None),
                      seed=seed, device=context.device,
                      autocast=config.autocast and context.device.startswith("cuda"))
        resolved = ctx.resolved(**hashed_values(cfg, init=parent.record() if parent else None, inputs=inputs))
        digest = config_hash(resolved)
        names = {"tilt": cfg.tilt, "tilt_ess": cfg.tilt_ess, "k": cfg.k, "seed": seed}
        where = _member(out, names, varied if len(combos) > 1 else [])
        if where is None:
            where, reuse = _default_output(digest, context.force)
            if reuse:
                records.append(where)
                continue
        elif len(combos) > 1 and not context.force and _trained_with(where, digest):
            kept.append(where)  # an interrupted sweep: its finished SAEs stay as they are
            records.append(where)
            continue
        records.append(where)
        extra = {"model": model, "hook": hook, **source, "tilt": cfg.tilt, "tilt_ess": cfg.tilt_ess,
                 "tilt_groups": cfg.tilt_groups, "l1_coefficient": cfg.l1,
                 **({"l0_coefficient": cfg.l0} if get_architecture(cfg.architecture).penalty == "l0" else {}),
                 "parent": parent.record() if parent else None, "seed": seed, "inputs": inputs,
                 "config": resolved, "created_by": created_by(context.program)}
        runs.append(Run(cfg, where, resolved, digest, extra, parent))
    if len({os.path.abspath(r) for r in records}) < len(records):
        raise BadInput(f"-o {out}: names the same folder for several SAEs (give a placeholder for every listed "
                       "option, e.g. {tilt})")
    if kept and not runs:  # the whole sweep is there: as for one output, overwrite only with --force
        raise BadInput(f"{kept[0]}: exists (use --force to overwrite)")
    if kept:
        log.info("%d of %d SAEs already trained (%s): training the others", len(kept), len(records),
                 ", ".join(os.path.basename(k) for k in kept))
    written = train_saes(activations, runs, force=context.force, quiet=context.quiet, stop=stop) if runs else []
    if runs and written[0] is None:  # a torchrun rank other than 0
        return []
    return [sae_artifact(path) for path in records] if main_rank() else []


def _trained_with(folder: str, digest: str) -> bool:
    """Whether `folder` holds a finished SAE trained with the configuration whose hash is `digest`."""
    from .autoencoder import read_config

    if not os.path.exists(os.path.join(folder, MARKER)):
        return False
    try:
        return config_hash(read_config(folder).get("config")) == digest
    except BadInput:
        return False


def _combinations(sweep: dict, seed: int) -> list[dict]:
    """Every combination of the swept values ({field: value}, seed included), the first field varying
    slowest."""
    import itertools

    fields = [f for f in (*SWEEPS, "seed") if f in sweep]
    unknown = sorted(set(sweep) - set(fields))
    if unknown:
        raise ConfigError(unknown[0], sweep[unknown[0]], "does not take a list")
    for f in fields:
        if not sweep[f] or len(set(sweep[f])) < len(sweep[f]):
            raise ConfigError(f, sweep[f], "give distinct values")
    axes = [tuple(sweep[f]) for f in fields]
    combos = [dict(zip(fields, values)) for values in itertools.product(*axes)]
    return [{**c, "seed": c.get("seed", seed)} for c in combos]


def value_text(value) -> str:
    """A value as a folder name shows it: 500.0 -> 500, 1e9 -> 1e9, 0.5 -> 0.5, None -> none."""
    if isinstance(value, float):
        return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{value:g}")
    return "none" if value is None else str(value)


def _member(out: str | None, values: dict, varied: list[str]) -> str | None:
    """Where one SAE goes: `out` with its {field} placeholders filled by `values`; else with several SAEs
    out/<the varied fields and values> (tilt500-seed1), with one `out` itself; None without `out`."""
    if out is None:
        return None
    if "{" in out:
        try:
            return out.format(**{f: value_text(v) for f, v in values.items()})
        except (KeyError, ValueError, IndexError) as e:
            raise BadInput(f"-o {out}: a bad name template ({type(e).__name__}: {e}); its placeholders are "
                           "{tilt}, {tilt_ess}, {k} and {seed}") from None
    if not varied:
        return out
    return os.path.join(out, "-".join(f"{SWEEPS.get(f, f)}{value_text(values[f])}" for f in varied))


def _check_parent_source(sae, config: FitConfig, model: str, hook: str, where: str,
                         prepend_bos: bool | None = None) -> None:
    """Refuse to finetune a parent trained on another model or hook, or on windows with(out) a BOS these
    lack (same width is not the same space), unless told to (--allow-init-mismatch); what a parent does
    not record is taken as it is."""
    from ..data.models import same_hook, same_model

    recorded = {k: sae.cfg.get(k) for k in ("model", "hook", "prepend_bos")}
    wanted = {"model": model, "hook": hook, "prepend_bos": prepend_bos}
    differ = [k for k in recorded if recorded[k] is not None and wanted[k] is not None and recorded[k] != wanted[k]
              and not (k == "model" and same_model(recorded[k], wanted[k]))
              and not (k == "hook" and same_hook(recorded[k], wanted[k]))]
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
