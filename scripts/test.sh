#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (slow tests on the real SmolLM2 included).
# Fast tests only:  scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
