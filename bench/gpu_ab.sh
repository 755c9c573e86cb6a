#!/usr/bin/env bash
# A/B of GPU rows on one machine: this working tree ("new") against an older tree ("old"),
# alternating per row so both see the same machine state. Prepare the old tree here, before
# the device call (it travels as a carried, git-ignored folder):
#
#   echo /.ab/ >> .git/info/exclude; rm -rf .ab/old; mkdir -p .ab/old
#   git archive REV jaxsd bench | tar -x -C .ab/old
#
# then on the GPU machine (carry .ab and .whl; see bench/README "GPU rows" for the wheels):
#
#   OUT=$OUT bash bench/gpu_ab.sh '^head$:100' '^ours_cudnn_sdpo_8bx4_large$:60'
#
# Each argument is ROW_REGEX:SECONDS (a bench/gpu_rows.sh ONLY regex and the time one run of
# it needs); a row whose time no longer fits the budget (BUDGET_S, default 430) is skipped and
# listed. Output: $OUT/ab_rows.jsonl (gpu_rows' JSON lines with "ab": "new" | "old" added) and
# $OUT/ab.log (each run's log and stderr tails). OLD (default .ab/old) names the old tree.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OLD=${OLD:-.ab/old}
OUT=${OUT:-/tmp/gpu_ab_out}
BUDGET_S=${BUDGET_S:-430}
[ -d "$OLD/jaxsd" ] || { echo "gpu_ab: no old tree at $OLD/jaxsd (see the header)" >&2; exit 2; }
[ $# -gt 0 ] || { echo "gpu_ab: name at least one ROW_REGEX:SECONDS" >&2; exit 2; }
mkdir -p "$OUT"
: >"$OUT/ab_rows.jsonl"
T0=$(date +%s)

# one TAG DIR REGEX SECONDS: gpu_rows.sh in DIR for the rows matching REGEX.
one() {
  local tag=$1 dir=$2 re=$3 need=$4 left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt "$need" ]; then
    echo "{\"ab\": \"$tag\", \"skipped\": \"$re\", \"left_s\": $left}" >>"$OUT/ab_rows.jsonl"
    return
  fi
  local out=/tmp/gpu_ab/$tag.$(date +%s%N)
  (cd "$dir" && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." OUT=$out DEADLINE_S=$left ONLY="$re" \
    TRACE=0 bash bench/gpu_rows.sh ${SMOKE:-} >/dev/null 2>&1)
  sed "s/^{/{\"ab\": \"$tag\", /" "$out/rows.jsonl" >>"$OUT/ab_rows.jsonl"
  { echo "=== $tag $re"; cat "$out/gpu_rows.log"; tail -n 5 "$out"/rows/*.err 2>/dev/null; } \
    >>"$OUT/ab.log"
  tail -n 1 "$OUT/ab_rows.jsonl" | cut -c1-300
}

for spec in "$@"; do
  one new "$ROOT" "${spec%:*}" "${spec##*:}"
  one old "$OLD" "${spec%:*}" "${spec##*:}"
done
echo "gpu_ab: done in $(($(date +%s) - T0)) s"
