"""ssae-explain: latent contexts, LM explanations with detection scores, and an HTML feature browser."""
from __future__ import annotations

import click

from ssae_common.explain.config import ExplainConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("explain")
@click.argument("sae", nargs=-1)
@config_options(ExplainConfig)
@click.option("-o", "--out", default=None, help="Output folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, sae, config, out):
    """Explain latents of SAE (a folder, or an ssae.artifact/1 record on stdin) from contexts in ACTIVATIONS.

    Writes OUT/explanations.jsonl (one ssae.explanation/1 record per latent) and OUT/index.html (a feature
    browser); prints an ssae.artifact/1 record.  Interrupted or failed runs keep their explanations in
    .OUT.partial; rerunning the same command continues."""
    from ssae_common.core.errors import BadInput
    from ssae_common.core.records import resolve_artifacts
    from ssae_common.explain.stage import explain

    paths = resolve_artifacts(sae, "sae")
    if len(paths) != 1:
        raise BadInput(f"expected one SAE, got {len(paths)}")
    common.emit(explain(config, paths[0], out=out, context=common))
