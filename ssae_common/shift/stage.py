"""The SHIFT stage from Python: `shift(ShiftConfig(...), saes)` runs what ssae-shift runs (SAE naming, per-SAE options, bios, cells, activations, probes, ablation) and writes the report."""
from __future__ import annotations

import json
import logging
import os
import sys

from ..core.config import ConfigError, hashed_values
from ..core.outputs import atomic_file, check_target, exclusive, existing_output, sha256_file
from ..core.parse import parse_latent_ranges, split_named, unique_names
from ..core.progress import Progress
from ..core.provenance import config_hash, created_by, input_fingerprint
from ..core.records import artifact_record, dump_json, resolve_artifacts
from ..core.runtime import RunContext
from ..data.models import (check_hook_name, document_activations, load_model, model_identity, resolve_model_dtype,
                           same_model)
from ..sae.imports import load_any, sae_config
from .config import ShiftConfig
from .attribution import read_explanations
from .bios import MASK_TOKEN, PROFESSION_WORDS, SPECIALTY_WORDS, build_cells, load_bios, mask_pattern, mask_text, \
    parse_side, read_mask_words
from .method import SaeSpec, run_shift
from .report import SCHEMA, ablated_summary, aggregate_rows, format_table, gender_left_summary, paired_differences

log = logging.getLogger("ssae")

ATTRIBUTION = ("attribution patching: mean over ambiguous training docs of sum_t dM/df_tj * (a_j - f_tj), "
               "M the probe logit signed to the true class, x = decode(f) + err with err fixed")


def shift(config: ShiftConfig, saes, *, out: str | None = None, context: RunContext | None = None) -> dict:
    """Run SHIFT for every SAE of `saes` (folders, NAME=DIR, or "-" for sae artifact records on stdin) and write the ssae.shift/1 report to `out` (default: under
    $SSAE_WORKDIR, named by the hash of the resolved configuration, reused unless context.force).
    Returns the shift artifact record."""
    context = context or RunContext()
    config.check()
    if isinstance(saes, str) or not saes:
        raise ConfigError("saes", saes, "give at least one SAE")
    side_a, side_b = parse_side(config.professions[0]), parse_side(config.professions[1])
    named = _sae_paths(saes)
    names = [n for n, _ in named]
    ablate_by = _per_sae(config.ablate, names, "ablate", "auto", broadcast=True)
    explain_by = _per_sae(config.explanations, names, "explanations", None)
    hook, model = _hook_and_model(named, config.model)
    if config.mask_words is not None and not os.path.isfile(config.mask_words):
        raise ConfigError("mask_words", config.mask_words, "no such file")

    check_hook_name(model, hook, flag="the SAEs' hook")
    model_dtype = resolve_model_dtype(config.model_dtype, context.device, model)
    bos = _windows_bos(named)
    resolved = context.resolved(**hashed_values(
        config, data=[{"path": p, "sha256": input_fingerprint(p)} for p in config.data], professions=[side_a, side_b],
        saes=[{"name": n, "path": os.path.abspath(p), "sha256": sha256_file(p), "ablate": ablate_by[n],
               "explanations": explain_by[n]} for n, p in named],
        model=model_identity(model), model_dtype=model_dtype, bos=bos, hook=hook,
        mask_words=None if config.mask_words is None else {"path": os.path.abspath(config.mask_words),
                                                           "sha256": input_fingerprint(config.mask_words)}))
    if out is None:
        out, reuse = existing_output("shift", config_hash(resolved), ".json", force=context.force)
        if reuse:
            return shift_artifact(out)
    check_target(out, context.force)

    with exclusive(out):  # one writer per output
        bios, seen = load_bios(config.data, set(side_a + side_b), config.text_field, config.profession_field,
                               config.gender_field)
        masked = _mask(bios, config)
        seeds = [context.seed + s for s in range(config.seeds)]
        splits = [build_cells(bios, side_a, side_b, seen, pairing=config.pairing, test_fraction=config.test_fraction,
                              val_fraction=config.val_fraction, max_per_cell=config.max_per_cell, seed=seed,
                              data_name=", ".join(config.data)) for seed in seeds]
        log.info("cells (split seed %d): %s", seeds[0], json.dumps(splits[0].counts))

        device = context.device
        specs = []
        for n, p in named:
            sae = load_any(p, device, field="saes")
            latents = None if ablate_by[n] == "auto" else _latents(ablate_by[n], sae.d_sae, n)
            specs.append(SaeSpec(n, p, sae, latents, read_explanations(explain_by[n]) if explain_by[n] else None))
        lm = load_model(model, device=device, model_dtype=model_dtype, prepend_bos=bos)
        lm.check_hook(hook)
        for spec in specs:
            if spec.sae.d_in != lm.hook_width(hook):
                raise ConfigError("saes", spec.path, f"d_in {spec.sae.d_in} does not match {lm.name}'s width "
                                                     f"{lm.hook_width(hook)} at {hook}")
        # one LM pass over every document some split uses
        used = sorted({i for cells in splits for i in cells.train_ambiguous + cells.train_balanced + cells.val + cells.test})
        with Progress("activations", total=len(used), unit="docs", quiet=context.quiet) as progress:
            acts, token_lists = document_activations(lm, [bios[i].text for i in used], hook,
                                                     context_size=config.context_size, batch_size=config.batch_size,
                                                     progress=progress)
        # run_shift indexes documents by their position in `used`
        position = {i: k for k, i in enumerate(used)}
        bodies = []
        for seed, cells in zip(seeds, splits):
            for attr in ("train_ambiguous", "train_balanced", "val", "test"):
                setattr(cells, attr, [position[i] for i in getattr(cells, attr)])
            cells.label, cells.gender = cells.label[used], cells.gender[used]
            body = run_shift(acts, token_lists, cells, specs, lm.tokenizer, config, seed=seed, device=device)
            bodies.append({"seed": seed, "cells": cells.counts, **body})
        report = {"schema": SCHEMA, "created_by": created_by(context.program), "config": resolved,
                  "seed": context.seed, "model": lm.name, "hook": hook, "professions": {"A": side_a, "B": side_b},
                  "mask": masked, "probe": config.probe, "cells": splits[0].counts, "ablation": config.ablation,
                  "attribution": ATTRIBUTION, "rows": aggregate_rows([b["rows"] for b in bodies]),
                  "differences": paired_differences([b["rows"] for b in bodies]),
                  "ablated": ablated_summary([b["saes"] for b in bodies]),
                  "gender_left": gender_left_summary([b["saes"] for b in bodies]), "splits": bodies}
        with atomic_file(out, force=context.force) as tmp:
            with open(tmp, "w") as f:
                dump_json(report, f, indent=2)
        print(format_table(report), file=sys.stderr)
        return shift_artifact(out)


def _mask(bios, config: ShiftConfig) -> dict | None:
    """Mask the profession words in place (--mask-professions or --mask-words, and --mask-specialties);
    returns what was done."""
    if config.mask_words is None and not config.mask_professions and not config.mask_specialties:
        return None
    if config.mask_words:
        words = read_mask_words(config.mask_words)
    else:
        words = list(PROFESSION_WORDS) if config.mask_professions else []
    if config.mask_specialties:
        words += SPECIALTY_WORDS
    pattern = mask_pattern(words)
    replaced = 0
    for bio in bios:
        bio.text, n = mask_text(bio.text, pattern)
        replaced += n
    log.info("masked %d profession/specialty words in %d bios", replaced, len(bios))
    return {"words": words, "token": MASK_TOKEN, "replacements": replaced}


def shift_artifact(path: str) -> dict:
    """The artifact record of a written shift report (fresh or reused)."""
    with open(path) as f:
        report = json.load(f)
    return artifact_record("shift", path, rows=len(report["rows"]),
                           worst_group_accuracy={r["method"]: r["worst_group_accuracy"] for r in report["rows"]})


def _sae_paths(values) -> list[tuple[str, str]]:
    """(name, path) of every SAE: NAME=DIR, DIR, or - for sae artifact records on stdin."""
    given, paths = [], []
    for value in values:
        name, path = split_named(value)
        if path == "-":
            piped = resolve_artifacts(["-"], "sae")
            given += [None] * len(piped)
            paths += piped
        else:
            given.append(name)
            paths.append(path)
    return list(zip(unique_names(paths, given), paths))


def _per_sae(values, names: list[str], field: str, default, *, broadcast: bool = False) -> dict:
    """Values of a per-SAE option: NAME=VALUE pairs, or plain values in SAE order (with `broadcast`, one
    plain value applies to every SAE not named)."""
    out = {n: default for n in names}
    plain = []
    for value in values:
        name, rest = split_named(value)
        if name in out:
            out[name] = rest
        elif name is not None and "," not in name:
            raise ConfigError(field, value, f"no SAE named {name!r} (names: {', '.join(names)})")
        else:
            plain.append(value)
    if broadcast and len(plain) == 1:
        return {n: plain[0] if out[n] == default else out[n] for n in names}
    if len(plain) > len(names):
        raise ConfigError(field, tuple(values), f"{len(plain)} values for {len(names)} SAE(s); use NAME=VALUE")
    for n, value in zip(names, plain):
        out[n] = value
    return out


def _latents(spec: str, d_sae: int, sae_name: str) -> list[int]:
    try:
        return parse_latent_ranges(spec, d_sae, field="ablate", allow_all=False)
    except ConfigError as e:
        raise ConfigError("ablate", spec, f"{e.message} in SAE {sae_name}") from None


def _windows_bos(named: list[tuple[str, str]]) -> bool:
    """Whether documents start with BOS: as the SAEs' activations were taken (cfg.json prepend_bos)."""
    recorded = {n: sae_config(p, field="saes").get("prepend_bos") for n, p in named}
    values = {v for v in recorded.values() if v is not None}
    if len(values) > 1:
        raise ConfigError("saes", [p for _, p in named], f"the SAEs were trained with and without BOS ({recorded})")
    return values.pop() if values else True


def _hook_and_model(named: list[tuple[str, str]], model: str | None) -> tuple[str, str]:
    """The hook the SAEs share (from cfg.json) and the model to run: `model`, else the one the SAEs name."""
    configs = {n: sae_config(p, field="saes") for n, p in named}
    hooks = {c.get("hook") for c in configs.values()}
    if len(hooks) != 1 or None in hooks or "" in hooks:
        detail = ", ".join(f"{n}: {c.get('hook')}" for n, c in configs.items())
        raise ConfigError("saes", [p for _, p in named], f"the SAEs must share one hook recorded in cfg.json "
                                                         f"({detail})")
    if model is None:
        models = {c.get("model") for c in configs.values()}
        if len(models) != 1 or not next(iter(models)):
            raise ConfigError("saes", [p for _, p in named], "the SAEs' cfg.json give no single model; "
                                                             "set the model (--model)")
        return hooks.pop(), models.pop()
    for n, c in configs.items():
        recorded = c.get("model")
        if recorded and not same_model(recorded, model):
            log.warning("%s was trained on %s, running it on %s", n, recorded, model)
    return hooks.pop(), model
