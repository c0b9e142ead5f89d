"""ssae-shift: SHIFT on Bias in Bios (probe, latent attribution, ablation, retraining) for one or more SAEs."""
from __future__ import annotations

import click

from ssae_common.shift.config import ShiftConfig
from ssae_tools.base import config_options, ssae_command


@ssae_command("shift")
@config_options(ShiftConfig)
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE directory, NAME=DIR, or - for sae artifact records on stdin (repeatable).")
@click.option("-o", "--out", default=None, help="Output shift.json (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, config: ShiftConfig, saes, out):
    """Train a profession probe where gender is spurious, find the SAE latents it relies on, ablate the
    gender ones and measure the probe on a balanced test set."""
    from ssae_common.shift.stage import shift

    common.emit(shift(config, saes, out=out, context=common))


if __name__ == "__main__":
    main()
