"""ssae-eval: the paper's metrics for one SAE or many (reconstruction, sparsity, spliced-in perplexity,
tail coverage, entropy, activation counts, decoder similarity), PNG plots and an HTML report."""
from __future__ import annotations

import click

from ssae_common.eval.config import EvalConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("eval")
@click.argument("saes", nargs=-1)
@config_options(EvalConfig)
@click.option("-o", "--out", default=None, help="Output folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, saes, config, out):
    """Evaluate SAEs (folders, or ssae.artifact/1 records on stdin) on test DOCS or an ACTIVATIONS file.

    Writes OUT/metrics.json (ssae.metrics/1), PNG plots and report.html; prints one artifact record."""
    from ssae_common.eval.stage import evaluate_saes

    common.emit(evaluate_saes(config, list(saes), out=out, context=common))


if __name__ == "__main__":
    main()
