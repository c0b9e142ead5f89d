"""The options of ssae-explain, each declared once: ContextConfig (which windows are drawn from the
activation file) and ExplainConfig (it, plus the inputs, the explainer and the scorer).

Light on purpose: imported by the tool's --help, so only the standard library and core.config."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ConfigError, check_bounds, option, replace

EXPLAINERS = ("local", "openai", "none")
LM_LATENTS = 50  # the default selection with an LM explainer: a sample (latents are in no order), not hours


@dataclass(frozen=True)
class ContextConfig:
    """How contexts are drawn for each latent (ssae_common.explain.contexts)."""

    n_explain: int = option(10, min=1, help="Top-activating windows shown to the explainer.")
    n_score: int = option(5, min=0, help="Held-out activating windows for scoring (as many non-activating "
                                         "ones are added).")
    window_left: int = option(12, min=0, help="Tokens before the activating token.")
    window_right: int = option(4, min=0, help="Tokens after it.")
    reservoir: int = option(256, min=1, help="Activating positions sampled per latent (quantiles, top tokens, "
                                             "histogram).")
    chunk_rows: int | None = option(None, min=1, help="Store rows per chunk.", derived="from the number of latents",
                                    hashed=False, why="memory only: the contexts drawn do not depend on it")
    hist_bins: int = option(20, min=1, cli=False, help="Bins of each latent's activation histogram.")
    n_top_tokens: int = option(10, min=1, cli=False, help="Most frequent activating tokens listed per latent.")

    def check(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, kw_only=True)
class ExplainConfig(ContextConfig):
    """Everything ssae-explain is told besides the SAE, the output folder and the run context."""

    activations: str = option(help="Activation file (ssae.activations/1 .h5, with document text) to draw "
                                   "contexts from.")
    latents: str | None = option(None, help="Latents to explain, e.g. 0-99,512, or all.",
                                 derived=f"the first {LM_LATENTS} with an LM explainer (minutes each on a CPU), "
                                         "all with --explainer none")
    explainer: str = option("local", choices=EXPLAINERS,
                            help="local: a Hugging Face causal LM in-process; openai: an OpenAI-compatible "
                                 "endpoint; none: token statistics only (no LM).")
    explainer_model: str | None = option(None, help="local: model alias, folder or HF name [default: smollm2]; "
                                                    "openai: the served model name.")
    explainer_url: str | None = option(None, envvar=("SSAE_EXPLAINER_URL", "OPENAI_BASE_URL"),
                                       help="openai: base URL of the endpoint, e.g. http://localhost:8000/v1 "
                                            "(or $OPENAI_BASE_URL).")
    api_key_env: str | None = option("OPENAI_API_KEY", hashed=False, why="where the key is read, not what is asked",
                                     help="Environment variable holding the API key (unset: no Authorization "
                                          "header).")
    scorer_url: str | None = option(None, help="Score detection with this OpenAI-compatible endpoint instead.")
    scorer_model: str | None = option(None, help="Scorer model: the served name with --scorer-url, else a local "
                                                 "model.", derived="the explainer")
    score: bool = option(True, help="Compute detection precision/recall/F1.")
    tokenizer_model: str | None = option(None, flag="model", help="Model whose tokenizer decodes the contexts.",
                                         derived="the activation file's model")
    retries: int = option(2, min=0, help="Retries of a malformed LM reply.")
    max_new_tokens: int = option(48, min=1, help="Tokens per generated field (openai: x3 for the whole reply).")
    temperature: float = option(0.0, min=0, help="0 = greedy; retries sample at >= 0.7.")
    timeout: float = option(120.0, above=0, help="Seconds per HTTP request.",
                            hashed=False, why="how long to wait, not what is asked")
    batch_latents: int = option(8, min=1, help="Latents per checkpoint (explanations are saved after each batch).",
                                hashed=False, why="how often to checkpoint: each latent is explained alone")

    def check(self) -> None:
        check_bounds(self)
        if self.explainer == "openai" and not self.explainer_url:
            raise ConfigError("explainer", self.explainer, "needs explainer_url (the endpoint's base URL, "
                                                           "--explainer-url or $OPENAI_BASE_URL)")
        if self.explainer == "openai" and not self.explainer_model:
            raise ConfigError("explainer", self.explainer, "needs explainer_model (the model name the endpoint "
                                                           "serves, --explainer-model)")

    @property
    def scoring(self) -> bool:
        return self.score and self.explainer != "none"

    def resolve(self, store_model: str | None) -> ExplainConfig:
        """Defaults that depend on the activation file: the tokenizer is its model's.  The scorer options
        are dropped when nothing is scored, so that they do not change the run's hash."""
        tokenizer = self.tokenizer_model or store_model
        if not tokenizer:
            raise ConfigError("tokenizer_model", None, "the activation file names no model: give the model "
                                                       "whose tokenizer decodes its tokens")
        scoring = self.scoring
        return replace(self, tokenizer_model=tokenizer, score=scoring,
                       scorer_url=self.scorer_url if scoring else None,
                       scorer_model=self.scorer_model if scoring else None)
