"""ssae-tables: the paper's text tables from ssae-eval metrics.json, ssae-shift JSON and harvested .h5 files."""
from __future__ import annotations

import click

from ssae_common import __version__
from ssae_common.core.errors import BadInput
from ssae_tools.base import SsaeCommand, _fail


# A plain command, not ssae_command: it only reads files and prints text, so --device, --seed and
# --force would mean nothing; errors follow the shared form ("ssae-tables: error: ...", exit 2).
@click.command("ssae-tables", cls=SsaeCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, required=True)
@click.version_option(__version__, prog_name="ssae-tables")
def main(files):
    """Print the tables of ssae-eval metrics.json and ssae-shift JSON FILES, and the composition of
    activation .h5 FILES, to stdout, one after another."""
    from ssae_common.eval.tables import tables

    try:
        text = tables(list(files))
    except BadInput as e:
        _fail("tables", str(e), e.exit_code)
    click.echo(text)


if __name__ == "__main__":
    main()
