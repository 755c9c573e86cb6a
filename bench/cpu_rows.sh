#!/usr/bin/env bash
# Our train step vs the hand-written PyTorch step on the CPU of any machine (e.g. a many-core
# GPU host, where the peer venvs of compare_peers.py cannot be installed: no network there).
#
#   SHAPES="tiny small" ALGOS="sdpo grpo" ROUNDS=2 bash bench/cpu_rows.sh
#
# Per round, shape and algorithm: ours (bench/train_step.py, JAX on CPU) then torch
# (bench/peers/torch_step.py, CUDA hidden), the order flipping every round so drift hits both.
# One JSON line per run on stdout and in $OUT/cpu_rows.jsonl: {"row", "round", ...the script's
# JSON}. Env: PY (default python3), OUT, SHAPES, ALGOS, ROUNDS, STEPS_tiny, STEPS_small,
# DEADLINE_S (stop starting runs when fewer than 30 s are left; default 3600), CPUSETS: cpu
# lists to pin both steps to in turn (`CPUSETS="0 0-1"`: one core, then two; rows get a
# `_cpus<list>` suffix, torch and XLA then see only those cores). Unset: no pinning.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/cpu_rows_out}
mkdir -p "$OUT"
ROWS="$OUT/cpu_rows.jsonl"
: >"$ROWS"
export PYTHONPATH="${PYTHONPATH:-.}" JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
DEADLINE=$(($(date +%s) + ${DEADLINE_S:-3600}))
declare -A STEPS=([tiny]=${STEPS_tiny:-20} [small]=${STEPS_small:-4} [0.6b]=2)

run() {  # run NAME ROUND SCRIPT ARGS...: the script's last JSON line, tagged
  local name=$1 round=$2 left json
  shift 2
  local pin=()
  if [ "$CPUSET" != all ]; then
    name="${name}_cpus$CPUSET"
    # taskset limits the cores; OMP_NUM_THREADS makes torch's pool match (XLA reads affinity).
    pin=(env OMP_NUM_THREADS="$(taskset -c "$CPUSET" nproc)" taskset -c "$CPUSET")
  fi
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "{\"row\": \"$name\", \"round\": $round, \"skipped\": \"deadline\"}" | tee -a "$ROWS"
    return
  fi
  json=$(timeout -k 5 "$left" "${pin[@]}" "$PY" "$@" 2>"$OUT/$name.$round.err" | grep '^{' | tail -n 1)
  if [ -n "$json" ]; then
    echo "{\"row\": \"$name\", \"round\": $round, ${json#\{}" | tee -a "$ROWS"
  else
    echo "{\"row\": \"$name\", \"round\": $round, \"error\": \"no JSON line (failed or timed out), see $OUT/$name.$round.err\"}" |
      tee -a "$ROWS"
  fi
}

for round in $(seq 1 "${ROUNDS:-2}"); do
  for CPUSET in ${CPUSETS:-all}; do
    for shape in ${SHAPES:-tiny small}; do
      for algo in ${ALGOS:-sdpo grpo}; do
        args=(--shape "$shape" --algo "$algo" --steps "${STEPS[$shape]}")
        ours=(bench/train_step.py "${args[@]}")
        peer=(bench/peers/torch_step.py "${args[@]}")
        if [ $((round % 2)) = 1 ]; then
          run "ours_${algo}_$shape" "$round" "${ours[@]}"
          run "torch_${algo}_$shape" "$round" "${peer[@]}"
        else
          run "torch_${algo}_$shape" "$round" "${peer[@]}"
          run "ours_${algo}_$shape" "$round" "${ours[@]}"
        fi
      done
    done
  done
done
