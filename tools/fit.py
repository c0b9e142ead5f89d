"""ssae-fit: activations -> a sparse autoencoder (`ssae.sae/1` directory), by ERM or tilted ERM,
from scratch or finetuned from a general SAE (--init).  Under torchrun it trains data-parallel
(ssae_common.sae.distributed.DataParallel); rank 0 writes the output and prints the record.

--tilt, --tilt-ess, --k and --seed take comma-separated lists: every combination is one SAE, all trained
from one read of the data per seed (ssae_common.sae.stage.fit_sweep), one record each.

The options are the fields of ssae_common.sae.config.FitConfig; the work is ssae_common.sae.stage.fit."""
from __future__ import annotations

import click

from ssae_common.sae.config import SWEEPS, FitConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("fit", seed_list=True)
@click.argument("activations", nargs=-1)
@config_options(FitConfig, lists=tuple(SWEEPS))
@click.option("-o", "--out", default=None,
              help="Output SAE folder (default: under $SSAE_WORKDIR, named by a hash); for several SAEs, the "
                   "folder that holds one per combination, named like tilt500-k32 by the listed options.")
def main(common, activations, config, sweep, out):
    """Train an SAE on ACTIVATIONS (.h5 paths, or ssae.artifact/1 records on stdin)."""
    from ssae_common.core.records import resolve_artifacts
    from ssae_common.sae.stage import fit_sweep

    records = fit_sweep(config, resolve_artifacts(activations, "activations"), sweep={**sweep, "seed": common.seeds},
                        out=out, context=common)
    for record in records:  # under torchrun only rank 0 writes and reports
        common.emit(record)


if __name__ == "__main__":
    main()
