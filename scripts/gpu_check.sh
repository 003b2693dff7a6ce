#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device call (see NOTES below):
# the GPU tests (tests/gpu, the custom-code VLM split on cuda:0 among them) and the GPU
# decode benchmark (bench/gpu_decode.py).
#
#   Here, once:   bash scripts/gpu_check.sh --wheels     # fetch our transformers & co. (PyPI)
#   On the GPU:   device run, carry [".gpu-wheels"], command "bash scripts/gpu_check.sh"
#
# The device image has its own PyTorch (CUDA) and an older transformers; our pinned
# transformers/tokenizers/safetensors/pillow/xxhash travel as wheels in .gpu-wheels/ (git-ignored) and
# are installed without dependencies. Reports land in $OUT (or /tmp/gpu-check): the test
# log, the benchmark table and bench/results/gpu_decode.json, and nvidia-smi.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then
    versions=$(python -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(transformers|tokenizers|safetensors|pillow|xxhash)==')
    rm -rf .gpu-wheels && mkdir -p .gpu-wheels
    # shellcheck disable=SC2086
    python -m pip download --no-deps --only-binary=:all: -d .gpu-wheels \
        --python-version 3.12 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        $versions
    ls -la .gpu-wheels
    exit 0
fi

out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python=python3
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    $python -m pip install -q --no-deps --no-index .gpu-wheels/*.whl >"$out/pip.txt" 2>&1
fi
$python -m pip install -q --no-deps --no-build-isolation -e . >>"$out/pip.txt" 2>&1 \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
$python - <<'EOF' | tee "$out/versions.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__)
EOF

status=0
$python -m pytest tests/gpu -q -rs -s -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
$python bench/gpu_decode.py "$@" 2>&1 | tee "$out/gpu_decode.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
cp bench/results/gpu_decode.json "$out/" 2>/dev/null
exit $status
