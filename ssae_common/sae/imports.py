"""Read SAEs written by other libraries into this package's `SAE` (the GSAE to finetune).

Formats (detected from the files, or named with `fmt`):
- `ssae`: our own directory (cfg.json with schema ssae.sae/1, sae.safetensors).
- `saelens`: a folder with cfg.json and sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec
  [d_sae, d_in], b_dec; optional scaling_factor).  Architectures standard/relu and topk; when
  `apply_b_dec_to_input` is false the encoder bias absorbs b_dec @ W_enc.
- `sparsify` (EleutherAI): a hookpoint folder with cfg.json and sae.safetensors (encoder.weight
  [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec); always TopK with cfg k.
- `dictionary_learning`: ae.pt (a torch state dict) with config.json beside it; AutoEncoder
  (encoder.weight, encoder.bias, decoder.weight [d_in, d_sae], bias) is ReLU, AutoEncoderTopK and
  BatchTopKSAE (b_dec, k) are TopK.  BatchTopK's inference threshold has no equivalent here: it is
  imported as per-token TopK with the same k.
All imports are exact for the listed architectures (same reconstruction as the source library).
"""
from __future__ import annotations

import logging
import os

import torch

from ..core.config import ConfigError
from ..core.errors import BadInput
from .autoencoder import CONFIG, SCHEMA, WEIGHTS, SAE, read_json_object
from .config import FORMATS

log = logging.getLogger("ssae")


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise BadInput(f"{path}: not a readable safetensors file ({e})") from None


def detect_format(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith(".pt"):
            return "dictionary_learning"
        raise ConfigError("init", path, "expected an SAE folder (or a dictionary_learning ae.pt)")
    if not os.path.isdir(path):
        raise ConfigError("init", path, "no such SAE folder")
    files = set(os.listdir(path))
    if "ae.pt" in files:
        return "dictionary_learning"
    if "sae_weights.safetensors" in files:
        return "saelens"
    if CONFIG in files and WEIGHTS in files:
        cfg = read_json_object(os.path.join(path, CONFIG))
        return "ssae" if cfg.get("schema") == SCHEMA else "sparsify"
    subs = sorted(d for d in files if os.path.isdir(os.path.join(path, d))
                  and os.path.exists(os.path.join(path, d, CONFIG)))
    if subs:
        raise ConfigError("init", path, f"holds several SAEs ({', '.join(subs[:6])}); give the one for your hook")
    raise ConfigError("init", path, "no SAE files found (expected ssae, SAELens, sparsify or dictionary_learning layout)")


def _need(tensors: dict, name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise BadInput(f"{where}: missing tensor {name!r}")
    return tensors[name].float()


def _build(where: str, W_enc, b_enc, W_dec, b_dec, architecture: str, k, cfg: dict) -> SAE:
    d_in, d_sae = W_enc.shape
    for name, t, shape in (("b_enc", b_enc, (d_sae,)), ("W_dec", W_dec, (d_sae, d_in)), ("b_dec", b_dec, (d_in,))):
        if tuple(t.shape) != shape:
            raise BadInput(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
    sae = SAE(d_in, d_sae, architecture, int(k) if k is not None else None)
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t)
    sae.cfg = {k_: v for k_, v in cfg.items() if v is not None}
    return sae


def _saelens(path: str) -> SAE:
    cfg = read_json_object(os.path.join(path, "cfg.json"))
    where = os.path.join(path, "sae_weights.safetensors")
    t = _safetensors(where)
    W_enc, b_enc, W_dec, b_dec = (_need(t, n, where) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    arch = str(cfg.get("architecture", "standard")).lower()
    act_fn = str(cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))).lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "topk" or act_fn == "topk":
        architecture, k = "topk", cfg.get("k", kwargs.get("k"))
        if k is None:
            raise BadInput(f"{path}/cfg.json: a topk SAE without k")
    elif arch in ("standard", "relu") and act_fn == "relu":
        architecture, k = "relu", None
    else:
        raise BadInput(f"{path}: SAELens architecture {arch!r} / activation {act_fn!r} cannot be imported "
                       "(supported: standard ReLU, topk)")
    if "scaling_factor" in t:  # old SAELens: f is multiplied by scaling_factor
        W_dec = W_dec * t["scaling_factor"].float()[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("normalize_activations") not in (None, "none", False):
        log.warning("%s: SAELens normalize_activations=%r is not carried over (act_scale 1)",
                    path, cfg.get("normalize_activations"))
    return _build(path, W_enc, b_enc, W_dec, b_dec, architecture, k,
                  {"model": cfg.get("model_name"), "hook": cfg.get("hook_name"),
                   "l1_coefficient": cfg.get("l1_coefficient")})


def _sparsify(path: str) -> SAE:
    cfg = read_json_object(os.path.join(path, CONFIG))
    where = os.path.join(path, WEIGHTS)
    t = _safetensors(where)
    enc = _need(t, "encoder.weight", where)
    if "W_skip" in t or cfg.get("skip_connection"):
        raise BadInput(f"{path}: sparsify SAE with a skip connection cannot be imported")
    if cfg.get("transcode"):
        raise BadInput(f"{path}: a sparsify transcoder is not an SAE")
    k = cfg.get("k")
    if k is None:
        raise BadInput(f"{path}/{CONFIG}: no k")
    return _build(path, enc.T.contiguous(), _need(t, "encoder.bias", where), _need(t, "W_dec", where),
                  _need(t, "b_dec", where), "topk", k, {})


def _dictionary_learning(path: str) -> SAE:
    weights = path if os.path.isfile(path) else os.path.join(path, "ae.pt")
    folder = os.path.dirname(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{weights}: not a readable torch state dict ({e})") from None
    if not isinstance(state, dict):
        raise BadInput(f"{weights}: expected a state dict")
    cfg_path = os.path.join(folder, "config.json")
    trainer = read_json_object(cfg_path).get("trainer", {}) if os.path.exists(cfg_path) else {}
    dict_class = trainer.get("dict_class")
    enc = _need(state, "encoder.weight", weights)
    W_dec = _need(state, "decoder.weight", weights).T.contiguous()
    if "b_dec" in state:  # AutoEncoderTopK / BatchTopKSAE
        b_dec = _need(state, "b_dec", weights)
        k = trainer.get("k", int(state["k"]) if "k" in state else None)
        if k is None:
            raise BadInput(f"{weights}: a TopK dictionary without k")
        if dict_class == "BatchTopKSAE" or "threshold" in state and "BatchTopK" in str(dict_class):
            log.warning("%s: BatchTopK imported as per-token TopK with k=%s", weights, k)
        architecture = "topk"
    elif "bias" in state:
        b_dec, k, architecture = _need(state, "bias", weights), None, "relu"
        if dict_class not in (None, "AutoEncoder"):
            raise BadInput(f"{weights}: dictionary class {dict_class!r} cannot be imported")
    else:
        raise BadInput(f"{weights}: unknown dictionary_learning layout (no 'bias' or 'b_dec')")
    hook = trainer.get("submodule_name")
    return _build(path, enc.T.contiguous(), _need(state, "encoder.bias", weights), W_dec, b_dec, architecture, k,
                  {"model": trainer.get("lm_name"), "hook": hook})


def import_sae(path: str, fmt: str = "auto") -> tuple[SAE, str]:
    """Load any supported SAE; returns (sae, format)."""
    if fmt not in FORMATS:
        raise ConfigError("init_format", fmt, f"expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "ssae":
        return SAE.load(path), fmt
    reader = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning}[fmt]
    if fmt != "dictionary_learning" and not os.path.isdir(path):
        raise ConfigError("init", path, "no such SAE folder")
    return reader(path), fmt


def parent_files(path: str) -> list[str]:
    """The files whose sha256 identifies a parent SAE."""
    if os.path.isfile(path):
        return [path]
    names = ("sae.safetensors", "sae_weights.safetensors", "ae.pt")
    return [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
