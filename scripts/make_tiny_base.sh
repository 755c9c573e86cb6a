#!/usr/bin/env bash
# Rebuild the shipped assets/tiny_base in its two SFT stages (about 25 min on a 2-core CPU).
# Stage 1 teaches the formats, the 1-digit facts (noisily) and copying a shown solution;
# stage 2 replaces the scattered near-miss noise by one systematic habit (answer + 1 on 75 %
# of student-format targets), which RL and self-distillation can remove.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAGE1=${STAGE1:-/tmp/jaxsd_tiny_base_stage1}
common=(--digits 1 --sft_on all --sft_size 150 --val_size 0 --test_size 40 --correct_frac 0.25
        --batch_size 32 --check_every 100 --target 2 --eval_n 8)
"$PY" scripts/make_base_model.py --out "$STAGE1" "${common[@]}" \
    --noise iid --copies 16 --max_steps 1200 --lr 3e-3
"$PY" scripts/make_base_model.py --out "${OUT:-assets/tiny_base}" --init "$STAGE1" "${common[@]}" \
    --noise off_by_one --copies 32 --max_steps 500 --lr 1e-3
cp "$STAGE1/make_base_model.json" "${OUT:-assets/tiny_base}/stage1_make_base_model.json"
