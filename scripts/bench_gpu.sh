#!/usr/bin/env bash
# The GPU figures in one go (issue 16), for a session that is lent a GPU: rollouts (hf vs vLLM, LoRA vs
# merged sync), SFT and DPO against TRL (with Liger, TRL's strongest GPU setting), GRPO and PPO steps.
# DPO also with two rows a pair: the shared-prompt row's custom mask keeps sdpa off its flash kernel on a GPU.
# Every row is its own process; each prints its result dict (peak_gpu_mb = torch.cuda.max_memory_allocated)
# as it ends, each script a table of ratios. Each script is cut at its limit: at most 9 minutes in all.
#
# The lent machine lacks most of align's dependencies and cannot download: scripts/prepare_gpu_run.sh gathers
# them into .gpu/ here first, with the model's config and tokenizer (this script gives it random weights there:
# the same shapes, so the same speed and memory). vLLM cannot be carried: without it, rollouts and RL use hf.
#   bash scripts/prepare_gpu_run.sh      # here; then, through the device tool:
#   bash scripts/bench_gpu.sh            # logs under $OUT (the device tool's folder) or bench-gpu/
#   bash scripts/bench_gpu.sh --check    # every row for a step or two on any device: the carried set works
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
CHECK=$([ "${1:-}" = "--check" ] && echo 1 || echo "")
LOG="${OUT:-bench-gpu}"
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$CHECK" ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU here: bench_gpu.sh measures GPU runs')" || exit 1
fi
mkdir -p "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$LOG/gpu.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG/gpu.txt"
import importlib.metadata as m
names = ["torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets", "pyarrow", "fsspec",
         "liger-kernel", "vllm"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        versions.append(f"{name} missing")
print(", ".join(versions))
EOF
if [ -f .gpu/model/config.json ]; then
    "$PY" -c "import sys; sys.path.insert(0, 'scripts'); from benchlib import give_random_weights as g; g('.gpu/model') and print('.gpu/model: random weights (the same shapes as SmolLM2-135M-Instruct)')" | tee -a "$LOG/gpu.txt"
    export ALIGN_BENCH_MODEL="$PWD/.gpu/model"
fi
[ -f data/gsm8k/train.jsonl ] || "$PY" -m align.cli data prepare gsm8k > /dev/null

run() {  # run LIMIT_SECONDS NAME COMMAND...: one benchmark script, its log kept even when cut at its limit
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$PY" "$@" 2>&1 | grep -v "^WARNING\|Warning:" | tee "$LOG/$name.txt" | grep -v "^ " | tail -n 40
}

if "$PY" -c "import vllm" 2>/dev/null; then
    rollouts=hf-batched,vllm-bf16-lora,vllm-bf16-merged
    rl=grpo-vllm,ppo-vllm
else
    echo "no vLLM here: rollouts and RL steps from hf generate" | tee -a "$LOG/gpu.txt"
    rollouts=hf-one-at-a-time,hf-batched
    rl=grpo-hf,ppo-hf
fi
if [ -n "$CHECK" ]; then  # a step or two of every row: proves the rows run here, measures nothing
    run 600 rollout scripts/bench_rollout.py --prompts 4 --tokens 8 --syncs 1 --only "$rollouts"
    run 600 sft scripts/bench_sft.py --steps 2 --only trl-qlora-defaults trl-qlora-no-dropout-liger align-qlora
    run 600 dpo scripts/bench_dpo.py --steps 2 --batch 2 --only trl-dpo-defaults align-dpo-precomputed
    run 600 rl scripts/bench_rl.py --steps 2 --tokens 8 --only "$rl"
else
    run 100 rollout scripts/bench_rollout.py --prompts 64 --tokens 128 --only "$rollouts"
    run 170 sft scripts/bench_sft.py --steps 20 --only trl-qlora-defaults trl-qlora-no-dropout trl-qlora-no-dropout-liger align-qlora align-qlora-no-checkpointing
    run 120 dpo scripts/bench_dpo.py --steps 12 --only trl-dpo-defaults align-dpo-precomputed align-dpo-precomputed-two-rows
    run 140 rl scripts/bench_rl.py --steps 4 --only "$rl"
fi
echo "logs: $LOG"
