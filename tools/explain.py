"""ssae-explain: latent contexts, LM explanations with detection scores, and an HTML feature browser."""
from __future__ import annotations

from dataclasses import dataclass, field

import click

from ssae_tools.base import ssae_command
from ssae_common.explain.contexts import ContextConfig
from ssae_common.core.errors import BadInput
from ssae_common.explain.explainers import run_explain
from ssae_common.core.records import resolve_artifacts


@dataclass
class ExplainJob:
    sae_path: str
    store_path: str
    latents: str | None
    explainer: str
    explainer_model: str | None
    explainer_url: str | None
    api_key_env: str | None
    scorer_url: str | None
    scorer_model: str | None
    score: bool
    tokenizer_model: str | None
    retries: int
    max_tokens: int
    temperature: float
    timeout: float
    batch_latents: int
    out: str | None
    ctx: ContextConfig = field(default_factory=ContextConfig)


@ssae_command("explain")
@click.argument("sae", nargs=-1)
@click.option("--activations", "activations", required=True,
              help="Activation file (ssae.activations/1 .h5, with document text) to draw contexts from.")
@click.option("--latents", default=None, help="Latents to explain, e.g. 0-99,512 [default: all].")
@click.option("--explainer", type=click.Choice(["local", "openai", "none"]), default="local", show_default=True,
              help="local: a Hugging Face causal LM in-process; openai: an OpenAI-compatible endpoint; "
                   "none: token statistics only (no LM).")
@click.option("--explainer-model", default=None,
              help="local: model alias, folder or HF name [default: smollm2]; openai: the served model name.")
@click.option("--explainer-url", default=None, envvar=["SSAE_EXPLAINER_URL", "OPENAI_BASE_URL"],
              help="openai: base URL of the endpoint, e.g. http://localhost:8000/v1 (or $OPENAI_BASE_URL).")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key (unset: no Authorization header).")
@click.option("--scorer-url", default=None, help="Score detection with this OpenAI-compatible endpoint instead.")
@click.option("--scorer-model", default=None,
              help="Scorer model: the served name with --scorer-url, else a local model [default: the explainer].")
@click.option("--score/--no-score", default=True, show_default=True, help="Compute detection precision/recall/F1.")
@click.option("--model", "tokenizer_model", default=None,
              help="Model whose tokenizer decodes the contexts [default: the activation file's model].")
@click.option("--n-explain", type=int, default=10, show_default=True, help="Top-activating windows shown to the explainer.")
@click.option("--n-score", type=int, default=5, show_default=True,
              help="Held-out activating windows for scoring (as many non-activating ones are added).")
@click.option("--window-left", type=int, default=12, show_default=True, help="Tokens before the activating token.")
@click.option("--window-right", type=int, default=4, show_default=True, help="Tokens after it.")
@click.option("--reservoir", type=int, default=256, show_default=True,
              help="Activating positions sampled per latent (quantiles, top tokens, histogram).")
@click.option("--chunk-rows", type=int, default=None, help="Store rows per chunk [default: from the number of latents].")
@click.option("--retries", type=int, default=2, show_default=True, help="Retries of a malformed LM reply.")
@click.option("--max-new-tokens", "max_tokens", type=int, default=48, show_default=True,
              help="Tokens per generated field (openai: x3 for the whole reply).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; retries sample at >= 0.7.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds per HTTP request.")
@click.option("--batch-latents", type=int, default=8, show_default=True,
              help="Latents per checkpoint (explanations are saved after each batch).")
@click.option("-o", "--out", default=None, help="Output folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, sae, activations, latents, explainer, explainer_model, explainer_url, api_key_env, scorer_url,
         scorer_model, score, tokenizer_model, n_explain, n_score, window_left, window_right, reservoir, chunk_rows,
         retries, max_tokens, temperature, timeout, batch_latents, out):
    """Explain latents of SAE (a folder, or an ssae.artifact/1 record on stdin) from contexts in ACTIVATIONS.

    Writes OUT/explanations.jsonl (one ssae.explanation/1 record per latent) and OUT/index.html (a feature
    browser); prints an ssae.artifact/1 record.  Interrupted or failed runs keep their explanations in
    .OUT.partial; rerunning the same command continues."""
    paths = resolve_artifacts(sae, "sae")
    if len(paths) != 1:
        raise BadInput(f"expected one SAE, got {len(paths)}")
    (store_path,) = resolve_artifacts([activations], "activations")
    if batch_latents < 1:
        raise BadInput(f"--batch-latents {batch_latents}: must be at least 1")
    if retries < 0:
        raise BadInput(f"--retries {retries}: must not be negative")
    if max_tokens < 1:
        raise BadInput(f"--max-new-tokens {max_tokens}: must be at least 1")
    if explainer == "openai" and not explainer_url:
        raise BadInput("--explainer openai needs --explainer-url (or $OPENAI_BASE_URL)")
    if explainer == "openai" and not explainer_model:
        raise BadInput("--explainer openai needs --explainer-model (the model name the endpoint serves)")
    ctx = ContextConfig(n_explain=n_explain, n_score=n_score, window_left=window_left, window_right=window_right,
                        reservoir=reservoir, chunk_rows=chunk_rows)
    ctx.check()
    job = ExplainJob(sae_path=paths[0], store_path=store_path, latents=latents, explainer=explainer,
                     explainer_model=explainer_model, explainer_url=explainer_url, api_key_env=api_key_env,
                     scorer_url=scorer_url, scorer_model=scorer_model, score=score, tokenizer_model=tokenizer_model,
                     retries=retries, max_tokens=max_tokens, temperature=temperature, timeout=timeout,
                     batch_latents=batch_latents, out=out, ctx=ctx)
    common.emit(run_explain(job, common))
