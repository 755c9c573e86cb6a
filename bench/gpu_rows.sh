#!/usr/bin/env bash
# GPU rows of issue 9 in one command: versions, bf16 matmul peak, our SDPO/GRPO steps vs the
# PyTorch peer (0.6B-shaped, Qwen3-8B-layer-shaped, small), the distillation head.
#
#   bench/gpu_rows.sh               # on the GPU machine (python3 = jax + torch there)
#   bench/gpu_rows.sh --cpu-smoke   # same rows, tiny shapes and steps, JAX on CPU
#
# One JSON line per row on stdout (also appended to $OUT/rows.jsonl); everything is tee'd to
# $OUT/gpu_rows.log; $OUT/summary.md pairs ours with the peer (bench/gpu_rows.py). Each row
# runs in its own process under `timeout`, so a failure or OOM costs only that row, and the
# whole script stops starting rows once its deadline (DEADLINE_S, default 430 s) is near.
# Env: PY (jax rows, default python3), PY_TORCH (torch rows, default $PY), PY_TRL (the TRL
# rows: a python with torch + trl + datasets, default $PY_TORCH), OUT, DEADLINE_S,
# PEAK_TFLOPS (nominal dense bf16 peak for MFU, default 989 = H100 SXM), FIRST (mfu | 0.6b),
# ATTNS (our attention implementations to time, default "cudnn jaxsd"; smoke "xla jaxsd"),
# TRACE (1 = profile one 8b-shaped SDPO run after the head row, 0 = skip), ONLY (bash regex:
# run only the rows whose name matches, e.g. ONLY='^(versions|trace_)').
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/gpu_rows_out}
mkdir -p "$OUT/rows"
LOG="$OUT/gpu_rows.log"
ROWS="$OUT/rows.jsonl"
: >"$ROWS"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:-.}"
# Let XLA take most of the GPU (default 75 %): the 8b-layer rows need ~60 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Rows of one shape share their state-init compile (and a rerun on a warm machine all of them).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxsd_jax_cache}
PY=${PY:-python3}
PY_TORCH=${PY_TORCH:-$PY}
PY_TRL=${PY_TRL:-$PY_TORCH}
PEAK=${PEAK_TFLOPS:-989}
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-430}))

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  S06=tiny; S8=tiny; L8=1; SSMALL=tiny
  FIXED=(--batch 2 --prompt 16 --response 16 --teacher-extra 8)
  LARGE06=(--batch 2 --prompt 32 --response 32)
  LARGE8=(--batch 2 --prompt 32 --response 32)
  STEPS=(--steps 2 --warmup 1 --matmul-n 256)
  OURS=(--chunk 64)  # our step's options only (the torch peer has no chunked head)
  MATMUL=(--matmul-n 512 --steps 3)
  HEAD=(--tokens 256 --time-tokens 256 --vocab 4096 --hidden 64 --chunk 64)
  TOPK=(--rows 64 --vocab 4096 --k 20 --widths 8 32)
  ROLLOUT=(--prompts 2 --n 2 --prompt-len 8 --new-tokens 8 --repeats 1)
  TRL=(--dtype float32 --steps 2 --warmup 1)  # TRL's bf16 autocast is CUDA only
  TUNIX=(--dtype bfloat16 --steps 2 --warmup 1)
else
  S06=0.6b; S8=8b; L8=4; SSMALL=small
  FIXED=()  # the issue's fixed workload: B 8, prompt 128 + response 128, teacher +64
  LARGE06=(--batch 16 --prompt 256 --response 256)
  LARGE8=(--batch 8 --prompt 512 --response 512)
  # LM-head chunks of 1024 tokens: 8 % faster than 256 at the 8B layer shape (H200, +4 GB).
  STEPS=(--steps 8 --warmup 2 --matmul-n 8192)
  OURS=(--chunk 1024)  # our step's options only (the torch peer has no chunked head)
  MATMUL=(--matmul-n 8192 --steps 20)
  HEAD=(--tokens 4096 --time-tokens 4096 --vocab 151936 --hidden 1024 --chunk 256)
  TOPK=(--rows 1024 --vocab 151936 --k 100 --widths 16 64 128 256)
  ROLLOUT=(--prompts 8 --n 8 --prompt-len 128 --new-tokens 256 --repeats 3)
  TRL=(--dtype bfloat16 --steps 8 --warmup 2)
  TUNIX=(--dtype bfloat16 --steps 8 --warmup 2)
fi
BF16=(--dtype bfloat16 --param-dtype float32 --peak-tflops "$PEAK")
# Our attention implementations to time (the fused cuDNN kernel first: the likely fastest).
if [ "$SMOKE" = 1 ]; then ATTNS=${ATTNS:-"xla jaxsd"}; else ATTNS=${ATTNS:-"cudnn jaxsd"}; fi
# A top-k block as wide as the vocabulary = one lax.top_k: the baseline of the pruned default.
if [ "$SMOKE" = 1 ]; then TOPK_PLAIN=512; else TOPK_PLAIN=151936; fi

# row NAME TIMEOUT_S CMD...: run CMD under timeout, keep its last JSON line, tag it with NAME.
row() {
  local name=$1 limit=$2
  shift 2
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 25 ]; then
    echo "{\"row\": \"$name\", \"skipped\": \"deadline: ${left}s left\"}" | tee -a "$ROWS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s) rc=0
  timeout -k 5 "$limit" "$@" >"$OUT/rows/$name.out" 2>"$OUT/rows/$name.err" || rc=$?
  local json
  json=$(grep '^{' "$OUT/rows/$name.out" | tail -n 1)
  if [ "$rc" = 0 ] && [ -n "$json" ]; then
    echo "{\"row\": \"$name\", \"wall_s\": $(($(date +%s) - t0)), ${json#\{}" | tee -a "$ROWS"
  else
    local why="exit $rc"
    [ "$rc" = 124 ] && why="timeout after ${limit}s"
    local tail_txt
    # Printable ASCII only: progress bars' carriage returns once made the JSON line invalid.
    tail_txt=$(tail -n 4 "$OUT/rows/$name.err" | tr '\n\t\r' '   ' | LC_ALL=C tr -cd ' -~' |
      tr -d '"\\' | cut -c1-600)
    echo "{\"row\": \"$name\", \"error\": \"$why\", \"stderr_tail\": \"$tail_txt\"}" |
      tee -a "$ROWS"
  fi
}

echo "== gpu_rows $(date -u +%FT%TZ) smoke=$SMOKE py=$PY py_torch=$PY_TORCH deadline=${DEADLINE_S:-430}s"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
row versions 60 "$PY" -c '
import importlib.metadata as md, json
names = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex",
         "numpy", "torch", "transformers"]
def v(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return None
import jax, flax
print(json.dumps({"versions": {n: v(n) for n in names}, "flax_file": flax.__file__,
                  "jax_devices": [str(d) for d in jax.devices()],
                  "device_kind": jax.devices()[0].device_kind}))'
row torch_versions 60 "$PY_TORCH" -c '
import json, torch, transformers
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))'
row matmul_bf16 60 "$PY" bench/train_step.py --matmul-only --dtype bfloat16 "${MATMUL[@]}" \
  --peak-tflops "$PEAK"
# The exact top-k alone, one LM-head chunk's rows: one lax.top_k vs the block-max-pruned default.
row topk 60 "$PY" bench/topk.py "${TOPK[@]}"

# pair SUFFIX T_OURS T_TORCH "ALGOS" ARGS...: ours (once per attention in $ATTNS) and the
# torch peer on the same workload, bf16, same step counts. Rows: ours_<algo>_SUFFIX (our
# attention), ours_<attn>_<algo>_SUFFIX (jax.nn.dot_product_attention), torch_<algo>_SUFFIX.
pair() {
  local suffix=$1 t_ours=$2 t_torch=$3 algos=$4
  shift 4
  for algo in $algos; do
    for attn in $ATTNS; do
      local name="ours_${attn}_${algo}_${suffix}"
      [ "$attn" = jaxsd ] && name="ours_${algo}_${suffix}"
      row "$name" "$t_ours" "$PY" bench/train_step.py --algo "$algo" --attention "$attn" "$@" \
        "${BF16[@]}" "${STEPS[@]}" "${OURS[@]}"
    done
    row "torch_${algo}_${suffix}" "$t_torch" "$PY_TORCH" bench/peers/torch_step.py \
      --algo "$algo" "$@" "${BF16[@]}" "${STEPS[@]}"
  done
}
# 0.6b-shaped, the issue's fixed workload.
rows_06_fixed() { pair "${S06}_fixed" 200 90 "sdpo grpo" --shape $S06 "${FIXED[@]}"; }
# MFU rows: Qwen3-8B layer shape cut to $L8 layers (AdamW state fits), larger workload.
rows_8b_mfu() { pair "${S8}x${L8}_large" 200 90 "sdpo grpo" --shape $S8 --layers $L8 "${LARGE8[@]}"; }
# One lax.top_k over the whole vocabulary against the default block-max-pruned exact top-k
# (StepConfig.topk_block = None), 8b×4 SDPO.
rows_topk() {
  row "ours_topkplain_sdpo_${S8}x${L8}_large" 200 "$PY" bench/train_step.py --algo sdpo \
    --attention "${ATTNS%% *}" --topk-block "$TOPK_PLAIN" --shape $S8 --layers $L8 "${LARGE8[@]}" \
    "${BF16[@]}" "${STEPS[@]}" "${OURS[@]}"
}
# Without the compilation cache: the one configuration seen to finish on the H100 (73 s; with
# the cache on, the row once ran past 120 s without a word).
rows_head() {
  JAX_ENABLE_COMPILATION_CACHE=false row head 180 "$PY" bench/train_step.py --head --head-torch --dtype bfloat16 "${HEAD[@]}"
}
# One more 8b×4 SDPO run (first attention in $ATTNS) with a 3-step profile and an HLO dump;
# bench/trace_summary.py turns them into $OUT/trace_summary.json (per-kernel ms and each fused
# matmul's GFLOP/s). The dump and the trace are deleted after (too many files to bring back).
rows_trace() {
  [ "${TRACE:-1}" = 1 ] || return
  local dir="$OUT/trace_8b" dump="$OUT/hlo_8b"
  rm -rf "$dir" "$dump"
  # A compilation-cache hit would skip the compile, and with it the HLO dump.
  JAX_ENABLE_COMPILATION_CACHE=false XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump" \
    row "trace_sdpo_${S8}x${L8}_large" 120 "$PY" bench/train_step.py --algo sdpo \
    --attention "${ATTNS%% *}" --shape $S8 --layers $L8 "${LARGE8[@]}" "${BF16[@]}" \
    "${STEPS[@]}" "${OURS[@]}" --steps 1 --warmup 0 --trace "$dir"
  local hlo
  hlo=$(ls -S "$dump"/*after_optimizations.txt 2>/dev/null | head -n 1)
  if [ -d "$dir" ] && [ -n "$hlo" ]; then
    "$PY" bench/trace_summary.py "$dir" --top 40 --hlo "$hlo" >"$OUT/trace_summary.json" ||
      echo "trace_summary failed"
  fi
  rm -rf "$dir" "$dump"
}
# 0.6b at a larger batch (MFU), the 8b-layer shape and small on the issue's fixed workload.
rows_rest() {
  pair "${SSMALL}_fixed" 60 45 "sdpo grpo" --shape $SSMALL "${FIXED[@]}"
  pair "${S06}_large" 150 90 "sdpo grpo" --shape $S06 "${LARGE06[@]}"
  pair "${S8}x${L8}_fixed" 90 60 "sdpo" --shape $S8 --layers $L8 "${FIXED[@]}"
  # Rollout: the embedded JAX sampler vs transformers generate, bf16 (no vLLM in the image).
  row rollout_${S06} 240 "$PY_TORCH" bench/rollout.py --shape $S06 --engines jax,torch \
    --dtype bfloat16 "${ROLLOUT[@]}"
}
# TRL's own trainers (SDPOTrainer, GKD loss, GRPOTrainer) and the hand-written torch SDPO step
# on the issue's fixed workload (B 8, 128 + 128): the peer a PyTorch user would pick.
rows_trl() {
  row "trl_${SSMALL}_fixed" 240 "$PY_TRL" bench/peers/trl_step.py --shape $SSMALL "${TRL[@]}"
  row "trl_${S06}_fixed" 300 "$PY_TRL" bench/peers/trl_step.py --shape $S06 "${TRL[@]}"
}
# tunix's GRPO learner step (grpo_loss_fn under PeftTrainer's jitted step), same workload, bf16
# compute over fp32 weights; needs google-tunix and its imports on $PY (wheels, see README).
rows_tunix() {
  row "tunix_${SSMALL}_fixed" 180 "$PY" bench/peers/tunix_step.py --shape $SSMALL "${TUNIX[@]}"
  row "tunix_${S06}_fixed" 240 "$PY" bench/peers/tunix_step.py --shape $S06 "${TUNIX[@]}"
}
# FIRST=mfu (default): the 8b×4 pair, plain top-k, head and profile before the 0.6b rows,
# whose 28 unrolled layers cost ~2 min of compile per row; FIRST=0.6b: the 0.6b pair first.
if [ "${FIRST:-mfu}" = mfu ]; then
  rows_8b_mfu; rows_topk; rows_head; rows_trace; rows_06_fixed; rows_rest; rows_trl; rows_tunix
else
  rows_06_fixed; rows_8b_mfu; rows_topk; rows_head; rows_trace; rows_rest; rows_trl; rows_tunix
fi

"$PY" bench/gpu_rows.py "$ROWS" | tee "$OUT/summary.md"
echo "== done in $(($(date +%s) - START)) s"
