"""Read SAEs written by other libraries into this package's `SAE`: every tool that takes an SAE goes
through `load_any` (and `sae_config` for its cfg.json fields), so ours and theirs are read alike.

Formats (detected from the files, or named with `fmt`); docs/formats.md has the field mapping:
- `ssae`: our own directory (cfg.json with schema ssae.sae/1, sae.safetensors).
- `saelens`: a folder with cfg.json and sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec
  [d_sae, d_in], b_dec; threshold for jumprelu; optional scaling_factor).  Architectures standard/relu,
  topk and jumprelu (SAELens writes its BatchTopK and Matryoshka BatchTopK SAEs as jumprelu); model and hook from `metadata`
  (SAELens 6) or the top level (older); `apply_b_dec_to_input: false` folds b_dec @ W_enc into b_enc;
  `rescale_acts_by_decoder_norm: true` folds the decoder norms into the encoder (exact, TopK selection
  included); `normalize_activations` `none`/`expected_average_only_in` need nothing (SAELens folds the
  average-norm factor into the weights when it saves), the per-token `constant_norm_rescale` and
  `layer_norm` have no equivalent and are refused.
- `sparsify` (EleutherAI): a hookpoint folder with cfg.json and sae.safetensors (encoder.weight
  [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec); TopK with cfg k.
- `dictionary_learning`: ae.pt (a torch state dict) with config.json beside it; AutoEncoder
  (encoder.weight, encoder.bias, decoder.weight [d_in, d_sae], bias) is ReLU, AutoEncoderTopK (b_dec, k)
  TopK, BatchTopKSAE (b_dec, k, threshold) BatchTopK with its inference threshold, MatryoshkaBatchTopKSAE
  (W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes) Matryoshka BatchTopK (plain BatchTopK without
  group_sizes), JumpReluAutoEncoder (W_enc, b_enc, W_dec, b_dec, threshold; it encodes x, not x - b_dec)
  JumpReLU; the class names each architecture reads are in its module (sae.architectures).
- `gemma_scope`: Gemma Scope's params.npz (W_enc, W_dec, b_enc, b_dec, threshold; JumpReLU on
  x @ W_enc + b_enc, so b_dec @ W_enc is folded into b_enc), or a folder holding one.
All imports are exact (the same reconstruction as the source library).
"""
from __future__ import annotations

import logging
import os

import torch

from ..core.config import ConfigError
from ..core.errors import BadInput
from .architectures import every, get
from .autoencoder import CONFIG, SCHEMA, WEIGHTS, SAE, read_config, read_json_object
from .config import FORMATS

log = logging.getLogger("ssae")


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise BadInput(f"{path}: not a readable safetensors file ({e})") from None


def _refuse(field: str | None, path: str, message: str) -> Exception:
    """ConfigError naming the option `field` (shown as its flag by the tools), or BadInput for a positional SAE."""
    return ConfigError(field, path, message) if field else BadInput(f"{path}: {message}")


def detect_format(path: str, field: str | None = "init") -> str:
    if os.path.isfile(path):
        if path.endswith(".pt"):
            return "dictionary_learning"
        if path.endswith(".npz"):
            return "gemma_scope"
        raise _refuse(field, path, "expected an SAE folder (or a dictionary_learning ae.pt, a Gemma Scope params.npz)")
    if not os.path.isdir(path):
        raise _refuse(field, path, "no such SAE folder")
    files = set(os.listdir(path))
    if "ae.pt" in files:
        return "dictionary_learning"
    if "params.npz" in files:
        return "gemma_scope"
    if "sae_weights.safetensors" in files:
        return "saelens"
    if CONFIG in files and WEIGHTS in files:
        cfg = read_json_object(os.path.join(path, CONFIG))
        return "ssae" if cfg.get("schema") == SCHEMA else "sparsify"
    subs = sorted(d for d in files if os.path.isdir(os.path.join(path, d))
                  and os.path.exists(os.path.join(path, d, CONFIG)))
    if subs:
        raise _refuse(field, path, f"holds several SAEs ({', '.join(subs[:6])}); give the one for your hook")
    raise _refuse(field, path, "no SAE files found (expected the ssae, SAELens, sparsify, dictionary_learning or "
                               "Gemma Scope layout)")


def _need(tensors: dict, name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise BadInput(f"{where}: missing tensor {name!r}")
    return tensors[name].float()


def _build(where: str, W_enc, b_enc, W_dec, b_dec, architecture: str, k, cfg: dict, threshold=None,
           group_sizes=None) -> SAE:
    if W_enc.dim() != 2:
        raise BadInput(f"{where}: W_enc has shape {tuple(W_enc.shape)}, expected [d_in, d_sae]")
    d_in, d_sae = W_enc.shape
    tensors = [("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)]
    if get(architecture).threshold:
        threshold = threshold.float().expand(d_sae) if threshold is not None and threshold.dim() == 0 else threshold
        tensors.append(("threshold", threshold))
    for name, t in tensors[1:]:
        shape = {"W_dec": (d_sae, d_in), "b_dec": (d_in,)}.get(name, (d_sae,))
        if t is None or tuple(t.shape) != shape:
            raise BadInput(f"{where}: {name} has shape {None if t is None else tuple(t.shape)}, expected {shape}")
    sae = SAE(d_in, d_sae, architecture, int(k) if k is not None else None, group_sizes=group_sizes)
    with torch.no_grad():
        for name, t in tensors:
            getattr(sae, name).copy_(t)
    sae.cfg = {k_: v for k_, v in cfg.items() if v is not None}
    return sae


def _saelens(path: str) -> SAE:
    cfg = read_json_object(os.path.join(path, "cfg.json"))
    where = os.path.join(path, "sae_weights.safetensors")
    t = _safetensors(where)
    W_enc, b_enc, W_dec, b_dec = (_need(t, n, where) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    arch = str(cfg.get("architecture", "standard")).lower()
    act_fn = str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))).lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if act_fn == "topk":  # older SAELens: a standard SAE with a topk activation function
        arch = "topk"
    ours = next((a for a in every() if arch in a.saelens_reads), None)
    if ours is None or (arch in ("standard", "relu") and act_fn != "relu"):
        supported = ", ".join(n for a in every() for n in a.saelens_reads)
        raise BadInput(f"{path}: SAELens architecture {arch!r} / activation {act_fn!r} cannot be imported "
                       f"(supported: {supported}; standard with a relu activation)")
    architecture, k, threshold = ours.name, None, None
    if "k" in ours.options:
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise BadInput(f"{path}/cfg.json: a {arch} SAE without k")
    if ours.threshold:
        threshold = _need(t, "threshold", where)
    norm = cfg.get("normalize_activations")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise BadInput(f"{path}/cfg.json: normalize_activations {norm!r} rescales each token; ssae.sae/1 has only "
                       "a constant act_scale, so this SAE cannot be imported exactly")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    # hook_z: SAELens concatenates the heads, as ssae-harvest stores attn.hook_z
    if cfg.get("reshape_activations") not in (None, "none") and not (
            cfg["reshape_activations"] == "hook_z" and str(hook).endswith("attn.hook_z")):
        raise BadInput(f"{path}/cfg.json: reshape_activations {cfg['reshape_activations']!r} at hook {hook!r} "
                       "is not supported")
    if "scaling_factor" in t:  # old SAELens: f is multiplied by scaling_factor
        W_dec = W_dec * t["scaling_factor"].float()[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales the pre-activations by ||W_dec_j|| before the activation and divides f by it before
        # decoding: the same as these weights with unit decoder rows
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        threshold = threshold * norms if threshold is not None else None
    # SAELens penalises the summed squared error, ssae its mean over d_in: its coefficients / d_in are ours
    d_in = W_enc.shape[0] if W_enc.dim() == 2 else 1
    per_dim = {f"{n}_coefficient": float(cfg[f"{n}_coefficient"]) / d_in for n in ("l1", "l0")
               if isinstance(cfg.get(f"{n}_coefficient"), (int, float))}
    prepend_bos = meta.get("prepend_bos", cfg.get("prepend_bos"))
    return _build(path, W_enc, b_enc, W_dec, b_dec, architecture, k,
                  {"model": meta.get("model_name") or cfg.get("model_name"), "hook": hook,
                   "prepend_bos": prepend_bos if isinstance(prepend_bos, bool) else None, **per_dim},
                  threshold)


def _sparsify(path: str) -> SAE:
    cfg = read_json_object(os.path.join(path, CONFIG))
    where = os.path.join(path, WEIGHTS)
    t = _safetensors(where)
    enc = _need(t, "encoder.weight", where)
    if "W_skip" in t or cfg.get("skip_connection"):
        raise BadInput(f"{path}: sparsify SAE with a skip connection cannot be imported")
    if cfg.get("transcode"):
        raise BadInput(f"{path}: a sparsify transcoder is not an SAE")
    if cfg.get("activation", "topk") != "topk":
        raise BadInput(f"{path}/{CONFIG}: sparsify activation {cfg.get('activation')!r} cannot be imported (topk only)")
    k = cfg.get("k")
    if k is None:
        raise BadInput(f"{path}/{CONFIG}: no k")
    # model_name/hook_name: not sparsify's fields, written by sae.export (sparsify names the hook by the folder)
    return _build(path, enc.T.contiguous(), _need(t, "encoder.bias", where), _need(t, "W_dec", where),
                  _need(t, "b_dec", where), "topk", k, {"model": cfg.get("model_name"), "hook": cfg.get("hook_name")})


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
    dict_class = str(trainer.get("dict_class") or "")
    names = {"model": trainer.get("lm_name"), "hook": trainer.get("submodule_name")}
    known = {name: a for a in every() for name in a.dictionary_learning}
    if dict_class and dict_class not in known:
        raise BadInput(f"{weights}: dictionary class {dict_class!r} cannot be imported (supported: "
                       f"{', '.join(known)})")
    ours = known.get(dict_class)  # None without a config.json: the tensors present decide
    if "W_enc" in state:
        W_enc, b_enc, W_dec, b_dec, threshold = (_need(state, n, weights)
                                                 for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
        if "k" in state or (ours is not None and "k" in ours.options):  # MatryoshkaBatchTopKSAE: encodes x - b_dec
            k = trainer.get("k", int(state["k"]) if "k" in state else None)
            if k is None:
                raise BadInput(f"{weights}: a BatchTopK dictionary without k")
            if "group_sizes" not in state:  # the groups matter to training only: without them, plain BatchTopK
                return _build(path, W_enc, b_enc, W_dec, b_dec, "batchtopk", k, names, threshold)
            sizes = [int(s) for s in state["group_sizes"].reshape(-1).tolist()]
            return _build(path, W_enc, b_enc, W_dec, b_dec, "matryoshka-batchtopk", k, names, threshold, sizes)
        # JumpReluAutoEncoder: ReLU(pre * (pre > threshold)) with pre = x @ W_enc + b_enc (no b_dec subtracted)
        return _build(path, W_enc, b_enc + b_dec @ W_enc, W_dec, b_dec, "jumprelu", None, names, threshold)
    enc = _need(state, "encoder.weight", weights)
    W_dec = _need(state, "decoder.weight", weights).T.contiguous()
    threshold = None
    if "b_dec" in state:  # AutoEncoderTopK / BatchTopKSAE
        b_dec = _need(state, "b_dec", weights)
        k = trainer.get("k", int(state["k"]) if "k" in state else None)
        if k is None:
            raise BadInput(f"{weights}: a TopK dictionary without k")
        architecture = "topk"
        if ours is not None and ours.threshold:  # BatchTopKSAE, at inference: relu(pre) * (relu(pre) > threshold)
            architecture, threshold = ours.name, _need(state, "threshold", weights)
    elif "bias" in state:
        b_dec, k, architecture = _need(state, "bias", weights), None, "relu"
    else:
        raise BadInput(f"{weights}: unknown dictionary_learning layout (no 'bias' or 'b_dec')")
    return _build(path, enc.T.contiguous(), _need(state, "encoder.bias", weights), W_dec, b_dec, architecture, k,
                  names, threshold)


def _gemma_scope(path: str) -> SAE:
    import numpy as np

    where = path if os.path.isfile(path) else os.path.join(path, "params.npz")
    try:
        with np.load(where) as z:
            params = {name: torch.from_numpy(np.asarray(z[name], dtype=np.float32)) for name in z.files}
    except (OSError, ValueError) as e:
        raise BadInput(f"{where}: not a readable .npz file ({e})") from None
    W_enc, b_enc, W_dec, b_dec, threshold = (_need(params, n, where)
                                             for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    if W_enc.dim() == 2 and b_dec.shape == (W_enc.shape[0],):
        b_enc = b_enc + b_dec @ W_enc  # Gemma Scope encodes x, not x - b_dec
    return _build(where, W_enc, b_enc, W_dec, b_dec, "jumprelu", None, {}, threshold)


READERS = {"saelens": _saelens, "sparsify": _sparsify, "dictionary_learning": _dictionary_learning,
           "gemma_scope": _gemma_scope}


def import_sae(path: str, fmt: str = "auto", field: str | None = "init") -> tuple[SAE, str]:
    """Load any supported SAE; returns (sae, format).  Errors name the option `field` (None: BadInput
    naming the path, for an SAE given as an argument)."""
    if fmt not in FORMATS:
        raise ConfigError("init_format", fmt, f"expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path, field)
    if fmt == "ssae":
        return SAE.load(path), fmt
    if fmt not in ("dictionary_learning", "gemma_scope") and not os.path.isdir(path):
        raise _refuse(field, path, "no such SAE folder")
    if not os.path.exists(path):
        raise _refuse(field, path, "no such SAE file or folder")
    return READERS[fmt](path), fmt


def load_any(path: str, device: str = "cpu", field: str | None = None) -> SAE:
    """The SAE at `path` in any supported format, on `device`; its `cfg` has at least model and hook when
    the files record them."""
    sae, fmt = import_sae(path, "auto", field)
    if fmt != "ssae":
        sae.cfg = {**sae.config(), "format": fmt}
    return sae.to(device)


def sae_config(path: str, field: str | None = None) -> dict:
    """The cfg.json fields of the SAE at `path` (ours read as they are; a foreign SAE's from its import)."""
    if detect_format(path, field) == "ssae":
        return read_config(path)
    return load_any(path, field=field).cfg


def parent_files(path: str) -> list[str]:
    """The files whose sha256 identifies a parent SAE."""
    if os.path.isfile(path):
        return [path]
    names = ("sae.safetensors", "sae_weights.safetensors", "ae.pt", "params.npz")
    return [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
