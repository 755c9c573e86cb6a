#!/usr/bin/env bash
# Rebuild assets/miniature_base (docs/miniature.md) from assets/tiny_base in two SFT stages of
# scripts/make_base_model.py on the `miniature` task (about 25 min on a shared 2-core CPU).
# Student-format targets are right with a per-band fraction (easy 1, intermediate 0.5,
# hard 0.05), else the answer + 1; stage 2 continues stage 1 so the easy band also saturates
# when sampled at temperature 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAGE1=${STAGE1:-/tmp/miniature_stage1}
common=(--task miniature --sft_on all --sft_size 240 --val_size 0 --test_size 60
        --band_correct easy=1,intermediate=0.5,hard=0.05 --noise off_by_one --copies 24
        --lr 1e-3 --batch_size 32 --check_every 100 --target 2 --eval_n 8)
"$PY" scripts/make_base_model.py --out "$STAGE1" --init assets/tiny_base "${common[@]}" \
    --max_steps 800
"$PY" scripts/make_base_model.py --out "${OUT:-assets/miniature_base}" --init "$STAGE1" \
    "${common[@]}" --max_steps 600
cp "$STAGE1/make_base_model.json" "${OUT:-assets/miniature_base}/stage1_make_base_model.json"
