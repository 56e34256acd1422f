"""Loading tokenizers and models: precision, bitsandbytes quantization, adapters from a stage folder."""

from __future__ import annotations

import functools
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from align.config import ModelConfig, QuantizationConfig
from align.data.templating import setup_chat_template
from align.models.resolve import resolve_model


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU runs bf16 matmuls natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(precision: str):
    """The same autocast the Trainer uses in training, so reference and policy logprobs agree at step 0."""
    if precision == "fp32":
        return nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def load_tokenizer(model_cfg: ModelConfig, path: Path | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model(model_cfg.name, model_cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    setup_chat_template(tokenizer, model_cfg.chat_template)
    if tokenizer.pad_token_id is None:
        # Padding is masked by attention mask and labels, never by id, so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantizationConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant.mode == "none":
        return None
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards flat parameters of one dtype: the packed 4-bit weights must be stored as the compute
        # dtype (two bf16 "values" hold four 4-bit codes) to be sharded with the rest (FSDP-QLoRA, as
        # transformers' and peft's guides set it). One process keeps bitsandbytes' uint8 default.
        bnb_4bit_quant_storage=compute_dtype if under_fsdp() else torch.uint8,
    )


def under_fsdp() -> bool:
    """Launched by `accelerate launch` with an FSDP config (accelerate sets this for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def load_base_model(
    model_cfg: ModelConfig,
    quant: QuantizationConfig,
    precision: str,
    path: Path | None = None,
    full_finetune: bool = False,
):
    """The base causal LM. Weights stay fp32 when they are trained (full fine-tuning): bf16
    AdamW updates lose small steps; frozen weights are stored in the compute dtype."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model(model_cfg.name, model_cfg.revision)
    compute_dtype = DTYPES[precision]
    quantization = None if full_finetune else bnb_config(quant, compute_dtype)
    storage_dtype = torch.float32 if full_finetune else compute_dtype
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=storage_dtype,
        quantization_config=quantization,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
        # bitsandbytes quantizes while placing weights: put a 4-bit base on this process's GPU at load
        # (not under FSDP: it places and shards the weights itself, from rank 0's copy)
        device_map={"": torch.cuda.current_device()}
        if quantization is not None and torch.cuda.is_available() and not under_fsdp()
        else None,
    )
    if quantization is not None:
        disable_bnb_cpu_repacking(model)
    return model


def disable_bnb_cpu_repacking(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer.

    bitsandbytes 0.50 repacks Linear4bit weights for AVX512-BF16 CPUs on the first no-grad eval
    forward and keeps that layout afterwards: its kernel has no autograd, so training after an
    evaluation backpropagates wrongly, and layers narrower than 2 x 64 inputs crash outright.
    Returns the layers changed. Covered by
    tests/test_adapters.py::test_qlora_gradients_are_unchanged_by_an_eval_pass.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def read_stage_manifest(folder: Path) -> dict:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder}: not a finished stage folder (no manifest.json)")
    return json.loads(manifest.read_text())
