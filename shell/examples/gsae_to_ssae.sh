#!/usr/bin/env bash
# The paper's recipe: a GSAE on general text, an SSAE finetuned from it with TERM on text retrieved
# from seed documents, and both evaluated on held-out subdomain text.
#   ./gsae_to_ssae.sh GENERAL SEEDS CORPUS TEST [OUTDIR]
set -euo pipefail
general="${1:?usage: gsae_to_ssae.sh GENERAL SEEDS CORPUS TEST [OUTDIR]}" seeds="${2:?}" corpus="${3:?}" test="${4:?}"
out="${5:-ssae-run}"
mkdir -p "$out"
ssae-harvest "$general" --max-tokens "${GENERAL_TOKENS:-200000}" -o "$out/general.h5" >/dev/null
ssae-fit "$out/general.h5" -o "$out/gsae" >/dev/null
# the test set never leaks into the training text
ssae-retrieve "$seeds" --corpus "$corpus" --exclude "$test" --top-k "${TOP_K:-300}" \
    | ssae-harvest -o "$out/subdomain.h5" \
    | ssae-fit --init "$out/gsae" --tilt-ess "${TILT_ESS:-0.5}" -o "$out/ssae" >/dev/null
ssae-eval "$out/gsae" "$out/ssae" --baseline "$out/gsae" --docs "$test" -o "$out/eval"
