"""ssae-harvest: documents -> activations at one hook point (an `ssae.activations/1` HDF5 file)."""
from __future__ import annotations

import click

from ssae_common.data.config import HarvestConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("harvest")
@click.argument("docs", nargs=-1)
@config_options(HarvestConfig)
@click.option("--merge", is_flag=True, help="Merge the --shard outputs given as arguments into one file.")
@click.option("-o", "--out", default=None, help="Output .h5 (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, docs, config, merge, out):
    """Run DOCS (paths, hf:NAME[:SPLIT], or - / stdin) through MODEL and store activations at HOOK.

    With --merge, DOCS are shard outputs (paths or artifact records on stdin), merged into input order.
    """
    from ssae_common.data import stage

    if merge:
        common.emit(stage.merge(list(docs), out=out, context=common))
    else:
        common.emit(stage.harvest(config, list(docs), out=out, context=common))
