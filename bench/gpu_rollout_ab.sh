#!/usr/bin/env bash
# Issue 28's GPU rollout goals in one call: the embedded sampler of this tree (padded, and
# with continuous batching) against an older tree's, alternating, on the 0.6B shape in bf16,
# 32 prompts x 8 samples, up to 1024 new tokens with varied stop lengths (bench/rollout.py
# --stop-every). Prepare the old tree here, before the device call (carry .ab):
#
#   echo /.ab/ >> .git/info/exclude; rm -rf .ab/old; mkdir -p .ab/old
#   git archive 2d6c290 jaxsd | tar -x -C .ab/old
#
# then on the GPU machine:  OUT=$OUT bash bench/gpu_rollout_ab.sh
# The old tree runs under this tree's bench/rollout.py (it only needs JaxEngine(model)).
# Output: $OUT/<tag>_<i>.json (one bench/rollout.py JSON each) and $OUT/summary.txt.
# Env: PY (default python3), OUT, OLD (default .ab/old), SLOTS (default 128),
# WORKLOAD (bench/rollout.py arguments; SMOKE=1: tiny shape on CPU).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_rollout_ab}
OLD=${OLD:-.ab/old}
SLOTS=${SLOTS:-128}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
if [ "${SMOKE:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  DEFAULT="--shape tiny --prompts 2 --n 4 --prompt-len 8 --new-tokens 16 --stop-every 16 --repeats 1"
else
  DEFAULT="--shape 0.6b --dtype bfloat16 --prompts 32 --n 8 --prompt-len 128 --new-tokens 1024
           --stop-every 1500 --repeats 2"
fi
read -r -a W <<<"${WORKLOAD:-$DEFAULT}"
[ -d "$OLD/jaxsd" ] || echo "gpu_rollout_ab: no old tree at $OLD/jaxsd; only this tree runs" >&2

one() {  # one TAG PYTHONPATH [extra bench/rollout.py arguments]
  local tag=$1 path=$2
  shift 2
  PYTHONPATH=$path "$PY" bench/rollout.py --engines jax "${W[@]}" "$@" \
    >"$OUT/$tag.json" 2>"$OUT/$tag.err" || echo "gpu_rollout_ab: $tag failed" >&2
}
for i in 1 2; do
  [ -d "$OLD/jaxsd" ] && one "old_$i" "$OLD"
  one "new_$i" "."
  one "new_slots_$i" "." --slots "$SLOTS"
done
"$PY" - "$OUT" >"$OUT/summary.txt" <<'PYEOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        row = json.loads(f.read_text().strip().splitlines()[-1])["engines"]["jax"]
    except (ValueError, KeyError, IndexError) as e:
        print(f"{f.stem}: no result ({e})")
        continue
    fr = row.get("decode_fraction_of_bound")
    print(f"{f.stem}: {row.get('tokens_per_s', 0):.0f} tokens/s, decode "
          f"{'n/a' if fr is None else f'{fr:.1%}'} of the bandwidth bound, {row.get('error', '')}")
PYEOF
cat "$OUT/summary.txt"
