#!/usr/bin/env bash
# Seed documents to a specialised SAE in one line: retrieve, harvest, fit with TERM (t = 500).
# Defaults come from SSAE_* variables, e.g.
#   SSAE_CORPUS=pool.jsonl.gz SSAE_MODEL=smollm2 SSAE_HOOK=blocks.6.hook_resid_post ./pipeline.sh seeds.txt
# Prints the ssae.artifact/1 record of the SAE.
set -euo pipefail
seeds="${1:?usage: pipeline.sh SEEDS}"
ssae-retrieve "$seeds" | ssae-harvest | ssae-fit --tilt-ess 0.5
