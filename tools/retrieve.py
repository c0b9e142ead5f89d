"""ssae-retrieve: seed documents -> subdomain documents from a large corpus (BM25, dense or hybrid
retrieval, optionally reranked by TracIn), as `ssae.doc/1` records (the work is in
ssae_common.retrieval.stage)."""
from __future__ import annotations

import click

from ssae_common.retrieval.config import RetrieveConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("retrieve")
@click.argument("seeds", nargs=-1)
@config_options(RetrieveConfig)
@click.option("-o", "--out", default=None,
              help="Write the records to this file, and print its ssae.artifact/1 record (kind docs).")
def main(common, seeds, config, out):
    """Retrieve documents like SEEDS (paths, or - / stdin; each seed is one query) from --corpus."""
    from ssae_common.retrieval.stage import rank_documents

    result = rank_documents(config, seeds, out=out, context=common)
    for rec in [result.artifact] if out else result.records:
        common.emit(rec)


if __name__ == "__main__":
    main()
