#!/usr/bin/env bash
# The GPU benchmarks on a machine without network, from this checkout and the pack that
# `make -C shell offline-pack` builds (shell/offline_pack.py): installs the pack's wheels into a scratch
# folder, runs the 5-value tilt sweep against one SAE (tests/bench/bench_fit.py --sweep-only), then
# bench-gpu (tests/bench/bench_gpu.py) on a randomly initialised model of the packed config (SmolLM2-135M's
# shapes: the same time as its weights), each within its own time limit, so that a slow one still leaves
# the other its turn. Logs and JSON go to OUT_DIR; the exit status is the first failure's.
#
#   bash shell/offline-bench.sh [OUT_DIR]         (default: $OUT, else ./offline-bench)
#   PACK=.offline-pack PYTHON=python3             the defaults
#   SWEEP_SECONDS=240 GPU_SECONDS=330             the time limits (together under ten minutes)
#   DRY=1                                         on the CPU at tiny sizes: checks the setup, times nothing
set -euo pipefail
cd "$(dirname "$0")/.."
pack=${PACK:-.offline-pack}
py=${PYTHON:-python3}
out=${1:-${OUT:-offline-bench}}
if [[ ! -f $pack/manifest.json ]]; then
    echo "offline-bench: no $pack/manifest.json (run make -C shell offline-pack, and bring the pack)" >&2
    exit 2
fi
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$pack/wheels/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" "$pack"/wheels/*.whl
fi
mkdir "$site/pkg" && ln -s "$PWD/tools" "$site/pkg/ssae_tools"
export PYTHONPATH="$site/pkg:$PWD:$site/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false SSAE_CACHE="$site/cache" SSAE_WORKDIR="$site/work"
gpu=(--model "$pack/model" --random-weights --out "$out/bench-gpu.json")
sweep=(--sweep-only --sweep-device cuda --sweep-repeats 2)
if [[ ${DRY:-0} == 1 ]]; then
    gpu+=(--dry)
    sweep=(--sweep-only --sweep-device cpu --sweep-repeats 1)
fi
status=0
timeout "${SWEEP_SECONDS:-240}" "$py" tests/bench/bench_fit.py "${sweep[@]}" 2>&1 | tee "$out/sweep.log" || status=$?
timeout "${GPU_SECONDS:-330}" "$py" tests/bench/bench_gpu.py "${gpu[@]}" 2>&1 | tee "$out/bench-gpu.log" \
    || { rc=$?; [[ $status != 0 ]] || status=$rc; }
exit "$status"
