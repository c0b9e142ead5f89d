"""ssae-shift: SHIFT on Bias in Bios (probe, latent attribution, ablation, retraining) for one or more SAEs."""
from __future__ import annotations

import json
import logging
import os

import click

from ssae_tools.base import ssae_command
from ssae_common.core.outputs import default_output
from ssae_common.core.errors import BadInput
from ssae_common.data.models import load_model, model_identity
from ssae_common.core.outputs import atomic_file, check_target, sha256_file
from ssae_common.core.provenance import config_hash, created_by, input_fingerprint
from ssae_common.core.records import artifact_record, resolve_artifacts
from ssae_common.sae.autoencoder import load_sae, read_config
from ssae_common.shift.method import (SCHEMA, SaeSpec, ShiftConfig, build_cells, document_activations, format_table,
                               load_bios, parse_latent_list, parse_side, parse_slice, read_explanations, run_shift)

log = logging.getLogger("ssae")


def _named(values, what: str) -> list[tuple[str | None, str]]:
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if sep and name and not os.path.exists(v):
            out.append((name, rest))
        else:
            out.append((None, v))
    return out


def _sae_paths(values) -> list[tuple[str, str]]:
    pairs = []
    for name, path in _named(values, "--sae"):
        if path == "-":
            pairs.extend((None, p) for p in resolve_artifacts(["-"], "sae"))
        else:
            pairs.append((name, path))
    named, used = [], set()
    for name, path in pairs:
        base = name or os.path.basename(os.path.normpath(path)) or "sae"
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}-{n}", n + 1
        used.add(candidate)
        named.append((candidate, path))
    return named


def _per_sae(values, names: list[str], option: str, default):
    """Values of a per-SAE option: NAME=VALUE pairs, or plain values in --sae order (one plain value
    applies to every SAE)."""
    out = {n: default for n in names}
    plain = []
    for v in values:
        name, sep, rest = v.partition("=")
        if sep and name in out:
            out[name] = rest
        elif sep and name and not os.path.exists(v) and "," not in name:
            raise BadInput(f"{option} {v}: no SAE named {name!r} (names: {', '.join(names)})")
        else:
            plain.append(v)
    if len(plain) == 1 and option == "--ablate":
        return {n: plain[0] if out[n] == default else out[n] for n in names}
    if len(plain) > len(names):
        raise BadInput(f"{option}: {len(plain)} values for {len(names)} SAE(s); use NAME=VALUE")
    for n, v in zip(names, plain):
        out[n] = v
    return out


@ssae_command("shift")
@click.option("--data", "data", multiple=True, required=True,
              help="Bias in Bios records: .jsonl/.jsonl.gz/.csv/.parquet or hf:LabHC/bias_in_bios[:SPLIT].")
@click.option("--professions", nargs=2, default=("professor", "nurse"), show_default=True,
              help="Sides A and B, each a comma-separated list of professions (names or LabHC indices).")
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE directory, NAME=DIR, or - for sae artifact records on stdin (repeatable).")
@click.option("--ablate", "ablate", multiple=True, default=("auto",), show_default=True,
              help="auto (latents chosen with a gender probe; uses gender labels), a list such as 12,98,200-203, "
                   "or NAME=LIST per SAE.")
@click.option("--ablation", type=click.Choice(["zero", "mean"]), default="zero", show_default=True,
              help="Ablated latents (and skyline neurons) are set to 0 or to their mean on the ambiguous set.")
@click.option("--slice", "slice_", default=None,
              help="Keep only the most active fraction of latents as candidates, e.g. 1/8 (the rest counts as error).")
@click.option("--model", default=None, help="Language model [default: the SAE's cfg.json model].")
@click.option("--explanations", multiple=True,
              help="ssae-explain output (folder or explanations.jsonl), in --sae order or NAME=PATH.")
@click.option("--pairing", type=click.Choice(["auto", "female-male", "male-female"]), default="auto",
              show_default=True,
              help="Genders of sides A and B in the ambiguous training set (auto: the pairing with more documents; "
                   "ties: A female).")
@click.option("--top", type=int, default=50, show_default=True, help="Top attributed latents considered by auto.")
@click.option("--auto-max", type=int, default=25, show_default=True, help="Most latents auto ablates.")
@click.option("--auto-min-drop", type=float, default=0.01, show_default=True,
              help="auto stops when the next latent lowers the gender probe's validation AUC by less.")
@click.option("--show", type=int, default=20, show_default=True, help="Top latents listed in the report.")
@click.option("--test-fraction", type=float, default=0.4, show_default=True,
              help="Test documents per cell, as a fraction of the smallest cell.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Validation documents per cell (for auto), as a fraction of the smallest cell.")
@click.option("--max-per-cell", type=int, default=1000, show_default=True,
              help="Documents kept per cell (seeded sample) before splitting.")
@click.option("--probe-c", type=float, default=1.0, show_default=True,
              help="Inverse L2 strength of the logistic-regression probes (standardised features).")
@click.option("--context-size", type=int, default=128, show_default=True,
              help="Tokens per document, BOS included (longer documents are truncated).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Documents per forward pass.")
@click.option("--text-field", default="auto", show_default=True, help="Text field (auto: hard_text, text or bio).")
@click.option("--profession-field", default="profession", show_default=True)
@click.option("--gender-field", default="gender", show_default=True)
@click.option("-o", "--out", default=None, help="Output shift.json (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, data, professions, saes, ablate, ablation, slice_, model, explanations, pairing, top, auto_max,
         auto_min_drop, show, test_fraction, val_fraction, max_per_cell, probe_c, context_size, batch_size,
         text_field, profession_field, gender_field, out):
    """Train a profession probe where gender is spurious, find the SAE latents it relies on, ablate the
    gender ones and measure the probe on a balanced test set."""
    for name, value, low in (("--top", top, 1), ("--auto-max", auto_max, 1), ("--show", show, 0),
                             ("--max-per-cell", max_per_cell, 3), ("--batch-size", batch_size, 1),
                             ("--context-size", context_size, 2)):
        if value < low:
            raise BadInput(f"{name} {value}: must be at least {low}")
    if probe_c <= 0:
        raise BadInput(f"--probe-c {probe_c}: must be positive")
    side_a, side_b = parse_side(professions[0]), parse_side(professions[1])
    fraction = parse_slice(slice_)
    named = _sae_paths(saes)
    names = [n for n, _ in named]
    ablate_by = _per_sae(ablate, names, "--ablate", "auto")
    explain_by = _per_sae(explanations, names, "--explanations", None)

    configs = {n: read_config(p) for n, p in named}
    hooks = {c.get("hook") for c in configs.values()}
    if len(hooks) != 1 or None in hooks or "" in hooks:
        detail = ", ".join(f"{n}: {configs[n].get('hook')}" for n in names)
        raise BadInput(f"--sae: the SAEs must share one hook recorded in cfg.json ({detail})")
    hook = hooks.pop()
    if model is None:
        models = {c.get("model") for c in configs.values()}
        if len(models) != 1 or not next(iter(models)):
            raise BadInput("--sae: the SAEs' cfg.json give no single model; pass --model")
        model = models.pop()
    else:
        for n in names:
            recorded = configs[n].get("model")
            if recorded and model_identity(recorded) != model_identity(model):
                log.warning("%s was trained on %s, running it on %s", n, recorded, model)

    resolved = common.resolved(
        data=[{"path": p, "sha256": input_fingerprint(p)} for p in data], professions=[side_a, side_b],
        saes=[{"name": n, "path": os.path.abspath(p), "sha256": sha256_file(p), "ablate": ablate_by[n],
               "explanations": explain_by[n]} for n, p in named],
        model=model_identity(model), hook=hook, ablation=ablation, slice=slice_, pairing=pairing, top=top,
        auto_max=auto_max, auto_min_drop=auto_min_drop, show=show, test_fraction=test_fraction,
        val_fraction=val_fraction, max_per_cell=max_per_cell, probe_c=probe_c, context_size=context_size,
        text_field=text_field, profession_field=profession_field, gender_field=gender_field)
    if out is None:
        out = default_output("shift", config_hash(resolved), ".json")
        if os.path.exists(out) and not common.force:
            click.echo(f"ssae-shift: reusing {out}", err=True)
            with open(out) as f:
                common.emit(_artifact(out, json.load(f)))
            return
    check_target(out, common.force)

    bios, seen = load_bios(data, set(side_a + side_b), text_field, profession_field, gender_field)
    cells = build_cells(bios, side_a, side_b, seen, pairing=pairing, test_fraction=test_fraction,
                        val_fraction=val_fraction, max_per_cell=max_per_cell, seed=common.seed,
                        data_name=", ".join(data))
    log.info("cells: %s", json.dumps(cells.counts))

    device = common.device
    specs = []
    for n, p in named:
        sae = load_sae(p, device)
        if ablate_by[n] != "auto":
            parse_latent_list(ablate_by[n], sae.d_sae, n)
        specs.append(SaeSpec(n, p, sae, ablate_by[n],
                             read_explanations(explain_by[n]) if explain_by[n] else None))
    lm = load_model(model, device=device)
    lm.check_hook(hook)
    for spec in specs:
        if spec.sae.d_in != lm.d_model:
            raise BadInput(f"--sae {spec.path}: d_in {spec.sae.d_in} does not match {lm.name}'s d_model {lm.d_model}")
    used = sorted(set(cells.train_ambiguous + cells.train_balanced + cells.val + cells.test))
    acts, token_lists = document_activations(lm, hook, [bios[i].text for i in used], context_size, batch_size,
                                             quiet=common.quiet)
    # run_shift indexes documents by their position in `used`
    position = {i: k for k, i in enumerate(used)}
    for attr in ("train_ambiguous", "train_balanced", "val", "test"):
        setattr(cells, attr, [position[i] for i in getattr(cells, attr)])
    cells.label, cells.gender = cells.label[used], cells.gender[used]

    cfg = ShiftConfig(ablation=ablation, top=top, auto_max=auto_max, auto_min_drop=auto_min_drop, probe_c=probe_c,
                      slice=fraction, show=show, seed=common.seed)
    body = run_shift(acts, token_lists, cells, specs, lm.tokenizer, cfg, device=device)
    report = {"schema": SCHEMA, "created_by": created_by("ssae-shift"), "config": resolved, "seed": common.seed,
              "model": lm.name, "hook": hook, "professions": {"A": side_a, "B": side_b},
              "cells": cells.counts, "ablation": ablation,
              "attribution": "attribution patching: mean over ambiguous training docs of "
                             "sum_t dM/df_tj * (a_j - f_tj), M the probe logit signed to the true class, "
                             "x = decode(f) + err with err fixed",
              **body}
    with atomic_file(out, force=common.force) as tmp:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
    click.echo(format_table(report), err=True)
    common.emit(_artifact(out, report))


def _artifact(path: str, report: dict) -> dict:
    return artifact_record("shift", path, rows=len(report["rows"]),
                           worst_group_accuracy={r["method"]: r["worst_group_accuracy"] for r in report["rows"]})
