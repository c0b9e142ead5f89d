"""The options of an evaluation (ssae-eval), each declared once: default, help text, bounds.

Light on purpose (standard library and core.config only): `ssae-eval --help` is built from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.config import ConfigError, check_bounds, option, replace
from ..data.config import DEFAULT_MODEL, MODEL_DTYPE_HELP, MODEL_DTYPES


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate the SAEs on (`docs` or `activations`, exactly one) and how."""

    docs: tuple[str, ...] = option((), multiple=True, hashed=False, why="hashed by content, as `inputs`",
                                   help="Test documents (.jsonl[.gz], .txt, .parquet, hf:NAME[:SPLIT]; repeatable): "
                                        "runs the LM for spliced-in perplexity and every activation metric.")
    activations: str | None = option(None, hashed=False, why="hashed by content, as `inputs`",
                                     help="A harvested activation file (.h5): activation metrics only.")
    baseline: str | None = option(None, help="The baseline SAE (the GSAE): relative perplexity, count log-ratios.")
    model: str | None = option(None, help="With --docs: the LM.",
                               derived=f"the model in the SAEs' cfg.json, else {DEFAULT_MODEL}")
    hook: str | None = option(None, help="With --docs: the hook point to splice.",
                              derived="the hook in the SAEs' cfg.json")
    model_dtype: str = option("auto", help="With --docs: " + MODEL_DTYPE_HELP, choices=MODEL_DTYPES)
    allow_model_mismatch: bool = option(
        False, help="Evaluate SAEs that record another model than the evaluated one (a warning, not an error).")
    context_size: int = option(128, min=2, help="With --docs: tokens per window, BOS included.")
    batch_size: int = option(8, min=1, help="With --docs: windows per forward pass.")
    rows: int = option(4096, min=1, help="With --activations: rows per chunk.")
    max_tokens: int | None = option(None, min=1, help="Evaluate at most this many tokens.")
    splice_bos: bool = option(False, help="Also replace the BOS position in the spliced and zero-ablated runs.")
    text_field: str = option("text", help="Field holding the text in JSON inputs.")
    max_pairs: int = option(8_000_000, min=2,
                            help="Bound on (latent, token type) pairs kept for tail coverage (16 bytes each).")
    cosine_pairs: int = option(2_000_000, min=1,
                               help="Decoder cosine: all pairs up to this many, else a random sample of this size.")
    dense_threshold: float = option(0.1, min=0, max=1, help="A latent is dense when active on more than this fraction of tokens.")

    def check(self) -> None:
        check_bounds(self)
        if bool(self.docs) == bool(self.activations):
            given = self.docs or self.activations
            raise ConfigError("docs", given, "give exactly one of --docs TEST or --activations TEST.h5")

    def resolve(self, sae_cfgs: list[dict], store_model: str | None = None,
                store_hook: str | None = None) -> "EvalConfig":
        """Fill `model` and `hook`.  On an activation file they are the file's (a given one must agree);
        on documents the given ones, else the first recorded in the SAEs' cfg.json (model: else smollm2).

        The resolved `model` is the spec to load; `data.models.model_identity` gives what is recorded."""
        from ..data.models import model_identity

        if self.activations:
            for name, given, held in (("model", self.model and model_identity(self.model), store_model),
                                      ("hook", self.hook, store_hook)):
                if given and given != held:
                    raise ConfigError(name, given, f"{self.activations} holds activations of {held!r}")
            return replace(self, model=store_model, hook=store_hook)
        model = self.model or next((c["model"] for c in sae_cfgs if c.get("model")), DEFAULT_MODEL)
        model = model if os.path.exists(model) else model_identity(model)  # SAELens's gpt2-small loads as gpt2
        hook = self.hook or next((c["hook"] for c in sae_cfgs if c.get("hook")), None)
        if hook is None:
            raise ConfigError("hook", None, "not given and no SAE's cfg.json records one: cannot tell where to splice")
        return replace(self, model=model, hook=hook)
