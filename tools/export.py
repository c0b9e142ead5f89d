"""ssae-export: an SAE in any format the tools read (ours, SAELens, sparsify, dictionary_learning, Gemma
Scope) written as a SAELens or sparsify folder (act_scale folded in), or as ours.

The options are the fields of ssae_common.sae.config.ExportConfig; the work is ssae_common.sae.export.export."""
from __future__ import annotations

import click

from ssae_common.sae.config import ExportConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("export")
@click.argument("sae", nargs=-1)
@config_options(ExportConfig)
@click.option("-o", "--out", default=None, help="Output folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, sae, config, out):
    """Write SAE (a folder or file, or an ssae.artifact/1 record on stdin) in the format --to."""
    from ssae_common.core.errors import BadInput
    from ssae_common.core.records import resolve_artifacts
    from ssae_common.sae.export import export

    paths = resolve_artifacts(sae, "sae")
    if len(paths) != 1:
        raise BadInput(f"expected one SAE, got {len(paths)}")
    common.emit(export(config, paths[0], out=out, context=common))


if __name__ == "__main__":
    main()
