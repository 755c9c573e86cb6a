#!/usr/bin/env bash
# The whole SC-SDPO RL step on one GPU, in one command: configs/sc_sdpo.py:gpu_0p6b (a
# random-init Qwen3-0.6B-shaped model made on the fly, the embedded sampler, 32 questions x
# 8 rollouts x up to 1024 tokens, 4 steps + one eval), then its per-step time split.
#
#   bench/gpu_rl_step.sh                                  # on the GPU machine
#   bench/gpu_rl_step.sh --config.total_steps=3           # any --config.* override
#   SMOKE=1 bench/gpu_rl_step.sh                          # the same preset at tiny size, CPU
#
# Env: PY (python with jax, default python3), OUT (default /tmp/gpu_rl_step). Writes
# $OUT/train.log, $OUT/run/metrics.jsonl and $OUT/split.json (bench/rl_step_split.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_rl_step}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
SIZES=()
if [ "${SMOKE:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SIZES=(--config.model.tiny.vocab_size=1024 --config.model.tiny.hidden_size=64
         --config.model.tiny.num_layers=2 --config.model.tiny.num_heads=4
         --config.model.tiny.num_kv_heads=2 --config.model.tiny.head_dim=16
         --config.model.tiny.intermediate_size=128 --config.model.compute_dtype=float32
         --config.total_steps=2 --config.eval_every=2 --config.task.questions_per_step=2
         --config.rollout.n=4 --config.rollout.max_new_tokens=8 --config.rollout.eval_n=2
         --config.rollout.eval_questions=2 --config.optim.micro_batches=2
         --config.loss.chunk_size=64 --config.loss.top_k=16 --config.task.max_reprompt_len=256)
fi
rm -rf "$OUT/run"  # this script's own run folder: each call is a fresh run
"$PY" scripts/train.py --config=configs/sc_sdpo.py:gpu_0p6b --config.run_dir="$OUT/run" \
  --config.resume=False "${SIZES[@]}" "$@" 2>&1 | tee "$OUT/train.log"
"$PY" bench/rl_step_split.py "$OUT/run" | tee "$OUT/split.json"
