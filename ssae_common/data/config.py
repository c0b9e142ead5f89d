"""The options of ssae-harvest, declared once (light: the tools' --help imports this module)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_bounds, option, replace
from ..core.runtime import parse_shard

DTYPES = ("float16", "float32", "bfloat16")  # how /activations may be stored
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # what the language model runs in
MODEL_DTYPE_HELP = ("What the language model's weights and forward pass run in (auto: the checkpoint's dtype "
                    "on CUDA, float32 on CPU).")
DEFAULT_MODEL = "smollm2"
DEFAULT_HOOK = "blocks.6.hook_resid_post"
# A document contributes at most its first 1024 tokens: whole for an abstract, a news story or a
# Wikipedia lead (a few hundred tokens), so ordinary documents are not cut, while one long document (a
# 35k-character newsletter is ~9k tokens) holds at most ~1% of a 100k-token harvest instead of ~9%.
DEFAULT_MAX_TOKENS_PER_DOC = 1024


def layer_hook(layer: int | str) -> str:
    """The residual stream after block `layer`, what --layer names."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class HarvestConfig:
    model: str = option(DEFAULT_MODEL,
                        help="Bundled alias (smollm2), Hugging Face name, local folder or .gguf file.")
    hook: str | None = option(None, help="TransformerLens hook name.", derived=DEFAULT_HOOK)
    layer: int | None = option(None, help=f"Shorthand for --hook {layer_hook('L')}.", min=0,
                               hashed=False, why="resolve() turns it into the hook")
    context_size: int = option(128, help="Tokens per window, BOS included.", min=2)
    batch_size: int = option(16, help="Windows per forward pass.", min=1)
    max_tokens: int | None = option(None, help="Stop after this many stored tokens.", min=1)
    max_tokens_per_doc: int = option(
        DEFAULT_MAX_TOKENS_PER_DOC, min=0,
        help="A document contributes at most its first this many tokens (so no long document dominates "
             "the set); 0: no cap.")
    spread: bool = option(
        False,
        help="With --max-tokens: count every input document's tokens in a first pass and cut all of them "
             "at one length, the largest that fits the budget, so the budget covers every document "
             "instead of the first ones (reads the inputs twice; not for hf: streams).")
    dtype: str = option("float16", help="How activations are stored (not what the model runs in: --model-dtype).",
                        choices=DTYPES)
    model_dtype: str = option("auto", help=MODEL_DTYPE_HELP, choices=MODEL_DTYPES)
    bos: bool = option(True, negative="no-bos",
                       help="Start every window with BOS (SAELens prepend_bos); --no-bos: the text alone.")
    drop_bos: bool = option(True, help="Store the BOS position or not.", negative="keep-bos")
    min_tokens: int = option(1, help="Documents with fewer tokens are skipped (and counted on stderr).", min=1)
    text_field: str = option("text", help="Field holding the text in JSON inputs.")
    store_text: bool = option(True, help="Keep document text in /docs/text.")
    shard: str | None = option(None, help="i/n: harvest every n-th document from the i-th.",
                               derived="from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, else 0/1")

    def check(self) -> None:
        check_bounds(self)
        if self.hook and self.layer is not None:
            raise ConfigError("layer", self.layer, "give a hook or a layer, not both")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.spread and self.max_tokens is None:
            raise ConfigError("spread", None, "needs a token budget to spread (max_tokens)")

    def resolve(self) -> HarvestConfig:
        """Checked, with the hook named (from `layer`, else the default) and the shard set (from the SLURM
        array variables when not given) in its canonical form i/n."""
        self.check()
        hook = self.hook or (layer_hook(self.layer) if self.layer is not None else DEFAULT_HOOK)
        i, n = parse_shard(self.shard)
        return replace(self, hook=hook, layer=None, shard=f"{i}/{n}")

    @property
    def shard_index(self) -> tuple[int, int]:
        """(i, n): this run takes input documents i, i + n, i + 2n, ...; all of them when `shard` is not set
        (the SLURM variables count only through `resolve()`)."""
        return parse_shard(self.shard) if self.shard is not None else (0, 1)
