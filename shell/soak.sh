#!/usr/bin/env bash
# Soak test (`make -C shell soak`, not part of CI): ssae-harvest, ssae-fit and a ssae-fit sweep written to
# -o DIR are killed with SIGTERM and SIGKILL at random points, and harvest and fit also run out of disk
# (a file size limit, `ulimit -f`, at a random size); each is rerun with the same command until it
# succeeds, and the result is compared with the output of an uninterrupted run (every array of the
# activation file; every tensor of each SAE and its training log).  TRIALS per tool and signal (default
# 20: 140 trials).
#
#   TRIALS=20 SEED=0 MODEL=tiny DOCS=400 TOOLS="harvest fit sweep" bash shell/soak.sh [WORKDIR]
#
# MODEL=tiny builds a tiny random Llama (seconds a run); any --model value (smollm2, a folder) works.
# One line per trial on stdout (tool, signal, point, exit codes, identical or not), a summary at the end;
# exit 1 when any trial differs, or a full disk is not one line naming "no space left".
set -euo pipefail
TRIALS="${TRIALS:-20}"
TOOLS="${TOOLS:-harvest fit sweep}"
SEED="${SEED:-0}"
MODEL="${MODEL:-tiny}"
DOCS="${DOCS:-400}"  # documents harvested (400 of about 45 words)
root="$(cd "$(dirname "$0")/.." && pwd)"
export SOAK_ROOT="$root" SOAK_DOCS="$DOCS"
work="${1:-$(mktemp -d /tmp/ssae-soak.XXXXXX)}"
mkdir -p "$work"
export SSAE_WORKDIR="$work/ssae-work"
RANDOM=$SEED
py() { python "$@"; }

if [ "$MODEL" = tiny ]; then
  py - "$work" <<'EOF'
import os, sys
sys.path.insert(0, os.path.join(os.environ.get("SOAK_ROOT", "."), "tests"))
from helpers import make_tiny_model, sample_docs, write_jsonl
work = sys.argv[1]
if not os.path.exists(os.path.join(work, "model", "config.json")):
    make_tiny_model(os.path.join(work, "model"))
write_jsonl(os.path.join(work, "docs.jsonl"), sample_docs(int(os.environ["SOAK_DOCS"]), 60, seed=1))
EOF
  MODEL="$work/model"
  HOOK=blocks.1.hook_resid_post
else
  HOOK="${HOOK:-blocks.6.hook_resid_post}"
  py - "$work" <<'EOF'
import os, sys
sys.path.insert(0, os.path.join(os.environ.get("SOAK_ROOT", "."), "tests"))
from helpers import sample_docs, write_jsonl
write_jsonl(os.path.join(sys.argv[1], "docs.jsonl"), sample_docs(int(os.environ["SOAK_DOCS"]), 60, seed=1))
EOF
fi

HARVEST=(ssae-harvest "$work/docs.jsonl" --model "$MODEL" --hook "$HOOK" --context-size 32 --batch-size 4 --device cpu -q)
# 1500 steps (several epochs of the harvested rows): most of a fit's time is training, not start-up
FIT=(ssae-fit --d-sae 64 --k 8 --batch-size 64 --train-tokens 96000 --checkpoint-every 25 --log-every 10
     --val-every 100 --val-tokens 512 --warmup-steps 20 --device cpu -q)

same() {  # same KIND A B: exit 0 when the two outputs hold the same data
  py - "$@" <<'EOF'
import json, sys
import numpy as np
kind, a, b = sys.argv[1:]
if kind == "harvest":
    import h5py
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("activations", "token_ids", "doc_index", "position", "docs/id", "docs/text"):
            if not np.array_equal(fa[name][:], fb[name][:]):
                sys.exit(f"{name} differs")
        for key in ("n_tokens", "n_docs", "complete"):
            if fa.attrs[key] != fb.attrs[key]:
                sys.exit(f"attribute {key} differs")
else:
    from safetensors.numpy import load_file
    ta, tb = load_file(f"{a}/sae.safetensors"), load_file(f"{b}/sae.safetensors")
    if ta.keys() != tb.keys() or any(not np.array_equal(ta[k], tb[k]) for k in ta):
        sys.exit("weights differ")
    la = [json.loads(l) for l in open(f"{a}/train_log.jsonl")]
    lb = [json.loads(l) for l in open(f"{b}/train_log.jsonl")]
    if la != lb:
        sys.exit("train_log.jsonl differs")
EOF
}

wait_for() {  # wait_for TOOL OUT REFERENCE FRACTION PID: return once OUT's partial holds FRACTION of the work
  py - "$@" <<'EOF'
import os, sys, time
tool, out, ref, f, pid = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
partial = os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".partial")
if tool == "harvest":
    import h5py
    with h5py.File(ref, "r") as h:
        total = int(h.attrs["n_tokens"])

    def done():
        try:
            with h5py.File(partial, "r", locking=False) as h:
                return int(h.attrs["n_tokens"])
        except Exception:  # not there yet, or being written
            return 0
else:
    total = sum(1 for _ in open(os.path.join(ref, "train_log.jsonl")))

    def done():
        try:
            return sum(1 for _ in open(os.path.join(partial, "train_log.jsonl")))
        except OSError:
            return 0
while done() < f * total and not os.path.exists(out):  # (out exists: it finished first)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.05)
EOF
}

run_timed() {  # run_timed OUT CMD...: prints the seconds the command took
  local start end
  start=$(date +%s.%N)
  "${@:2}" -o "$1" > /dev/null
  end=$(date +%s.%N)
  py -c "print(f'{$end - $start:.2f}')"
}

echo "soak: work folder $work, $TRIALS trial(s) per tool and signal, seed $SEED" >&2
ref_h5="$work/reference.h5"
rm -f "$ref_h5"
t_harvest=$(run_timed "$ref_h5" "${HARVEST[@]}")
FIT+=("$ref_h5")
ref_sae="$work/reference-sae"
rm -rf "$ref_sae"
t_fit=$(run_timed "$ref_sae" "${FIT[@]}")
SWEEP=("${FIT[@]}" --tilt "0,10" --seed "0,1")  # two seeds of two SAEs: one folder each under -o DIR
MEMBERS="tilt0-seed0 tilt0-seed1 tilt10-seed0 tilt10-seed1"
ref_sweep="$work/reference-sweep"
rm -rf "$ref_sweep"
t_sweep=0
case " $TOOLS " in *" sweep "*) t_sweep=$(run_timed "$ref_sweep" "${SWEEP[@]}");; esac
echo "soak: uninterrupted harvest ${t_harvest} s, fit ${t_fit} s, sweep ${t_sweep} s" >&2

complete() {  # complete TOOL OUT: whether OUT is finished
  if [ "$1" = sweep ]; then
    for m in $MEMBERS; do [ -e "$2/$m/cfg.json" ] || return 1; done
  else
    [ -e "$2" ]
  fi
}

same_output() {  # same_output TOOL REF OUT
  if [ "$1" = sweep ]; then
    for m in $MEMBERS; do same fit "$2/$m" "$3/$m" || return 1; done
  else
    same "$@"
  fi
}

disk_limit() {  # disk_limit TOOL F: a file size limit (1 KiB blocks) that runs out part of the way
  py -c "import os, sys; f = float(sys.argv[2]); size = os.path.getsize(sys.argv[3]) if sys.argv[1] == 'harvest' else \
4 * os.path.getsize(os.path.join(sys.argv[4], 'sae.safetensors')); print(max(1, int(f * size) // 1024))" \
    "$1" "$2" "$ref_h5" "$ref_sae"
}

total=0; identical=0; differ=0; killed=0
printf 'tool\tsignal\tpoint\tfirst_rc\treruns\tresult\n'
for tool in $TOOLS; do
  case $tool in
    harvest) cmd=("${HARVEST[@]}"); ref=$ref_h5; out="$work/trial.h5"; signals="TERM KILL DISK";;
    fit) cmd=("${FIT[@]}"); ref=$ref_sae; out="$work/trial-sae"; signals="TERM KILL DISK";;
    sweep) cmd=("${SWEEP[@]}"); ref=$ref_sweep; out="$work/trial-sweep"; signals="TERM KILL";;
  esac
  for sig in $signals; do
    for ((i = 0; i < TRIALS; i++)); do
      # a killed run's lock file stays: the next run must take it over
      rm -rf "$out" "$(dirname "$out")/.$(basename "$out").partial"
      # a random point of the work, measured by progress (not wall time, which varies with the load):
      # f < 0.1 kills during start-up (f/0.1 x 2 s), else once the partial output holds fraction f of the
      # reference's work (harvest: its checkpointed tokens; fit: its train_log.jsonl records); a sweep
      # is killed after fraction f of its uninterrupted time; a full disk comes at fraction f of the
      # reference output's size
      f=$(py -c "import random; random.seed($SEED * 100003 + $RANDOM); print(f'{random.uniform(0, 0.95):.3f}')")
      delay=$f
      rc=0
      if [ "$sig" = DISK ]; then
        ( ulimit -f "$(disk_limit "$tool" "$f")"; exec "${cmd[@]}" -o "$out" ) > /dev/null 2> "$work/disk.stderr" || rc=$?
        cat "$work/disk.stderr" >> "$work/soak.stderr"
        # a full disk is one line naming the path and "no space left", exit 1 (or the run fit: exit 0)
        if [ "$rc" -ne 0 ] && { [ "$rc" -ne 1 ] || [ "$(grep -c 'error: ' "$work/disk.stderr")" -ne 1 ] ||
                                ! grep -q 'no space left' "$work/disk.stderr" || grep -q Traceback "$work/disk.stderr"; }; then
          rc="$rc:BAD-MESSAGE"
        fi
      else
        "${cmd[@]}" -o "$out" > /dev/null 2>> "$work/soak.stderr" &
        pid=$!
        if [ "$tool" = sweep ]; then
          sleep "$(py -c "print($f * $t_sweep)")"
        elif py -c "import sys; sys.exit(0 if $f < 0.1 else 1)"; then
          sleep "$(py -c "print($f / 0.1 * 2)")"
        else
          wait_for "$tool" "$out" "$ref" "$f" "$pid"
        fi
        kill -s "$sig" "$pid" 2> /dev/null || true
        wait "$pid" || rc=$?
      fi
      [ "$rc" != 0 ] && killed=$((killed + 1))
      reruns=0
      while ! complete "$tool" "$out" && [ $reruns -lt 3 ]; do
        reruns=$((reruns + 1))
        "${cmd[@]}" -o "$out" > /dev/null 2>> "$work/soak.stderr" || true
      done
      total=$((total + 1))
      why=""
      if [[ "$rc" == *BAD-MESSAGE ]]; then
        differ=$((differ + 1)); result="DIFFERS: the full disk was not one 'no space left' line"
      elif complete "$tool" "$out" && why=$(same_output "$tool" "$ref" "$out" 2>&1); then
        identical=$((identical + 1)); result=identical
      else
        differ=$((differ + 1)); result="DIFFERS: ${why:-no output}"
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$sig" "$delay" "$rc" "$reruns" "$result"
    done
  done
done
echo "soak: $total trial(s), $killed interrupted before the end, $identical identical to the uninterrupted run, $differ differ" >&2
[ "$differ" -eq 0 ]
