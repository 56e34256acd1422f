"""Loading what a stage trained (base + adapter, or a whole model) and merging adapters for export."""

from __future__ import annotations

from pathlib import Path

import yaml

from align.artifacts import atomic_folder
from align.models.loading import load_base_model, load_tokenizer, read_stage_manifest, resolve_precision
from align.recipe import STAGE_SCHEMAS, StageConfig


def stage_config(folder: Path) -> StageConfig:
    raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    return STAGE_SCHEMAS[raw["kind"]].model_validate(raw)


def load_trained(folder: str | Path, quantized: bool | None = None, precision: str | None = None):
    """(model, tokenizer) from a finished stage folder or a plain model folder.

    ``quantized=None`` loads the base as it was trained (4-bit for QLoRA); False loads it in the
    compute dtype, which is what merging needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        # A plain transformers folder (a merged export, a converted GGUF).
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder), tokenizer
    manifest = read_stage_manifest(folder)
    if manifest.get("status") != "complete":
        raise RuntimeError(f"{folder}: the stage did not finish (status {manifest.get('status')!r})")
    cfg = stage_config(folder)
    precision = precision or resolve_precision(cfg.model.precision)
    artifact = folder / manifest["artifact"]
    if manifest["artifact"] == "model":
        tokenizer = load_tokenizer(cfg.model, artifact)
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=_dtype(precision))
        return model, tokenizer
    from peft import PeftModel

    tokenizer = load_tokenizer(cfg.model, artifact)
    quant = cfg.quantization
    if quantized is False:
        quant = quant.model_copy(update={"mode": "none"})
    base = load_base_model(cfg.model, quant, precision, Path(manifest["base_model_path"]))
    model = PeftModel.from_pretrained(base, artifact)
    model.eval()
    return model, tokenizer


def merge(folder: str | Path, output: str | Path, precision: str = "fp32") -> Path:
    """Merge a stage's adapter into its base and save a safetensors folder plain transformers loads.

    The base is loaded unquantized: merging LoRA deltas into 4-bit weights would round them away.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another --output")
    model, tokenizer = load_trained(folder, quantized=False, precision=precision)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
