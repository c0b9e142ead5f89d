"""Write an SAE (any format `imports.load_any` reads) as an ssae, SAELens or sparsify folder, loadable by
that library's own loader (`SAE.load_from_disk`, `SparseCoder.load_from_disk`).  docs/formats.md has
the layouts and the field mapping.

The other libraries have no act_scale, so it is folded into the weights.  With s = act_scale:

    W_enc' = W_enc    b_enc' = b_enc / s    threshold' = threshold / s    W_dec' = W_dec    b_dec' = b_dec / s

so pre' = (x - b_dec') @ W_enc' + b_enc' = pre / s, f' = f / s (ReLU, TopK and the thresholds are
positively homogeneous) and f' @ W_dec' + b_dec' = x_hat: the same reconstruction, the decoder rows
keeping their norm and the latents read in the activations' own units.

    from ssae_common.core.runtime import RunContext
    from ssae_common.sae.config import ExportConfig
    from ssae_common.sae.export import export
    record = export(ExportConfig(to="saelens"), "ssae-work/sae/3f2a...", out="sae-saelens", context=RunContext())
"""
from __future__ import annotations

import os

import torch

from ..core.config import ConfigError, hashed_values
from ..core.errors import BadInput
from ..core.outputs import atomic_dir, existing_output, sha256_file
from ..core.provenance import config_hash, created_by
from ..core.records import artifact_record, dump_json
from ..core.runtime import RunContext
from .autoencoder import SAE
from .config import ExportConfig

# the SAELens config layout written (version 6: model and hook under `metadata`); SAELens reads a config
# without a version as a pre-6 one
SAELENS_LAYOUT = "6.0.0"
MARKERS = {"ssae": "cfg.json", "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}


def folded_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (and threshold) with act_scale folded in."""
    s = float(sae.act_scale)
    t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc / s, "W_dec": sae.W_dec, "b_dec": sae.b_dec / s}
    if sae.arch.threshold:
        t["threshold"] = sae.threshold / s
    return {k: v.detach().float().cpu().contiguous() for k, v in t.items()}


def write_saelens(sae: SAE, folder: str) -> None:
    """cfg.json and sae_weights.safetensors as SAELens 6 saves an inference SAE, in the SAELens architecture
    of ours (its `saelens`).  BatchTopK and Matryoshka BatchTopK are written as jumprelu, as SAELens itself
    saves them for inference (the threshold applies to every latent); their k (and groups) go in metadata."""
    from safetensors.torch import save_file

    top_level, metadata = sae.arch.saelens_fields(sae)
    # whether the activations were taken with a BOS (SAELens prepend_bos); left out when the SAE does not say
    prepend_bos = sae.cfg.get("prepend_bos")
    bos = {"prepend_bos": prepend_bos} if isinstance(prepend_bos, bool) else {}
    cfg = {"architecture": sae.arch.saelens, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_LAYOUT, "model_name": sae.model or None,
                        "hook_name": sae.hook or None, "exported_by": "ssae", "ssae_architecture": sae.architecture,
                        **bos, **metadata}, **top_level}
    save_file(folded_tensors(sae), os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        dump_json(cfg, f, indent=2)


def write_sparsify(sae: SAE, folder: str) -> None:
    """cfg.json and sae.safetensors of one sparsify hookpoint folder (SparseCoder); TopK only."""
    from safetensors.torch import save_file

    if not sae.arch.sparsify:
        raise ConfigError("to", "sparsify", f"sparsify holds TopK SAEs only; this one is {sae.architecture} "
                                            "(write it --to saelens)")
    t = folded_tensors(sae)
    tensors = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": max(1, round(sae.d_sae / sae.d_in)), "normalize_decoder": True,
           "num_latents": sae.d_sae, "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": sae.d_in,
           # not sparsify's fields (its loader drops them): where the SAE reads, for the tools that import it back
           "model_name": sae.model or None, "hook_name": sae.hook or None}
    save_file(tensors, os.path.join(folder, "sae.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        dump_json(cfg, f, indent=2)


def write(sae: SAE, folder: str, to: str, **extra) -> None:
    """Write `sae` into the existing folder `folder` in the format `to`; `extra` goes into an ssae cfg.json."""
    if to == "ssae":
        sae.save(folder, **extra)
    elif to == "saelens":
        write_saelens(sae, folder)
    elif to == "sparsify":
        write_sparsify(sae, folder)
    else:
        raise ConfigError("to", to, "expected ssae, saelens or sparsify")


def export(config: ExportConfig, sae: str, *, out: str | None = None, context: RunContext | None = None) -> dict:
    """Write the SAE at `sae` (any supported format) as `config.to` into `out` (default: under
    $SSAE_WORKDIR/export, named by a hash of the input and options); returns its artifact record."""
    from .imports import detect_format, load_any, parent_files

    context = context or RunContext()
    config.check()
    model = load_any(sae)
    fmt = model.cfg.get("format") or detect_format(sae, None)
    if config.model:
        model.cfg["model"] = config.model
    if config.hook:
        model.cfg["hook"] = config.hook
    files = parent_files(sae)
    source = {"path": os.path.abspath(sae), "format": fmt,
              "sha256": sha256_file(files[0] if len(files) == 1 else sae)}
    resolved = context.resolved(**hashed_values(config, source=source))
    if out is None:
        out, reuse = existing_output("export", config_hash(resolved), marker=MARKERS[config.to], force=context.force)
        if reuse:
            return export_artifact(out, config.to)
    extra = {"exported_from": source, "created_by": created_by(context.program)} if config.to == "ssae" else {}
    if config.to == "ssae" and fmt != "ssae":
        model.cfg.pop("format", None)
    try:
        with atomic_dir(out, context.force) as tmp:
            write(model, tmp, config.to, **extra)
    except (OSError, ValueError) as e:
        raise BadInput(f"{out}: cannot write ({e})") from None
    return export_artifact(out, config.to)


def export_artifact(out: str, to: str) -> dict:
    """The `ssae.artifact/1` record (kind sae) of an exported folder."""
    from .imports import load_any

    sae = load_any(out)
    return artifact_record("sae", out, format=to, architecture=sae.architecture, d_in=sae.d_in, d_sae=sae.d_sae,
                           k=sae.k, model=sae.model or None, hook=sae.hook or None)
