#!/usr/bin/env bash
# The whole check: lint, format, types, tests. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check src tests bench
ruff format --check src tests bench
mypy
python -m pytest -q "$@"
