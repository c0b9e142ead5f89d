#!/usr/bin/env bash
# Dense retrieval reranked by TracIn against a GSAE (the paper's best data recipe), then harvest.
#   ./dense_tracin.sh SEEDS CORPUS GSAE OUT.h5
set -euo pipefail
seeds="${1:?usage: dense_tracin.sh SEEDS CORPUS GSAE OUT.h5}" corpus="${2:?}" gsae="${3:?}" out="${4:?}"
ssae-retrieve "$seeds" --corpus "$corpus" --method dense --top-k "${TOP_K:-300}" --rerank tracin --sae "$gsae" \
    | ssae-harvest -o "$out"
