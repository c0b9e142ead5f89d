#!/usr/bin/env bash
# Explain the first latents of an SAE with the bundled local LM and write the feature browser.
#   ./explain_latents.sh SAE ACTS.h5 OUTDIR [LATENTS]
set -euo pipefail
sae="${1:?usage: explain_latents.sh SAE ACTS.h5 OUTDIR [LATENTS]}" acts="${2:?}" out="${3:?}"
ssae-explain "$sae" --activations "$acts" --latents "${4:-0-15}" --explainer "${EXPLAINER:-local}" -o "$out"
echo "feature browser: $out/index.html" >&2
