#!/usr/bin/env bash
# The GPU figures in one go (issue 16), for a session that is lent a GPU: rollouts (hf vs vLLM, LoRA vs
# merged sync), SFT and DPO against TRL (with Liger, TRL's strongest GPU setting), GRPO and PPO steps.
# DPO also with two rows a pair: the shared-prompt row's custom mask keeps sdpa off its flash kernel on a GPU.
# Every row is its own process; each prints its result dict (peak_gpu_mb = torch.cuda.max_memory_allocated)
# as it ends, each script a table of ratios. About 10 minutes on one H200; each script is cut at its limit.
#   bash scripts/bench_gpu.sh            # logs under $OUT (the device tool's folder) or bench-gpu/
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG="${OUT:-bench-gpu}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU here: bench_gpu.sh measures GPU runs')" || exit 1
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/gpu.txt"
"$PY" -c "import vllm, trl, peft, bitsandbytes, liger_kernel" 2>/dev/null || echo "warning: one of vllm, trl, peft, bitsandbytes, liger_kernel is missing: its rows fail" | tee -a "$LOG/gpu.txt"
[ -f data/gsm8k/train.jsonl ] || "$PY" -m align.cli data prepare gsm8k

run() {  # run LIMIT_SECONDS NAME COMMAND...: one benchmark script, its log kept even when cut at its limit
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$PY" "$@" 2>&1 | grep -v "^WARNING\|Warning:" | tee "$LOG/$name.txt" | grep -v "^ " | tail -n 40
}

run 150 rollout scripts/bench_rollout.py --prompts 64 --tokens 128 --only hf-batched,vllm-bf16-lora,vllm-bf16-merged
run 170 sft scripts/bench_sft.py --steps 20 --only trl-qlora-defaults trl-qlora-no-dropout trl-qlora-no-dropout-liger align-qlora align-qlora-no-checkpointing
run 120 dpo scripts/bench_dpo.py --steps 12 --only trl-dpo-defaults align-dpo-precomputed align-dpo-precomputed-two-rows
run 150 rl scripts/bench_rl.py --steps 4 --only grpo-vllm,ppo-vllm
echo "logs: $LOG"
