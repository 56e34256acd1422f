#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (slow tests on the real SmolLM2 included).
# Fast tests only:  scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the surface first (seconds): formatted and linted as pyproject.toml's [tool.ruff] says
"$PY" -m ruff format --check . >/dev/null || { "$PY" -m ruff format --check . ; echo "run 'ruff format .' to fix"; exit 1; }
"$PY" -m ruff check --quiet .
exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
