#!/usr/bin/env bash
# Submit harvest (array) -> merge -> fit (requeued on timeout) -> eval, chained by dependencies.
#   DOCS=docs.jsonl TEST=test.jsonl OUT=/scratch/run1 shell/slurm/pipeline.sh [N_SHARDS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${DOCS:?}" "${TEST:?}" "${OUT:?}"
shards="${1:-8}"
export DOCS TEST OUT
harvest=$(sbatch --parsable --export=ALL --array="0-$((shards - 1))" "$here/harvest_array.sbatch")
merge=$(sbatch --parsable --export=ALL --dependency="afterok:${harvest%%;*}" "$here/merge.sbatch")
fit=$(sbatch --parsable --export=ALL --dependency="afterok:${merge%%;*}" "$here/fit.sbatch")
evaluation=$(sbatch --parsable --export=ALL --dependency="afterok:${fit%%;*}" "$here/eval.sbatch")
echo "harvest $harvest, merge $merge, fit $fit, eval $evaluation" >&2
