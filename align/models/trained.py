"""Loading what a stage trained (base + adapter, or a whole model) and merging adapters for export."""

from __future__ import annotations

from pathlib import Path

import yaml

from align.artifacts import atomic_folder
from align.models.loading import DTYPES, load_base_model, load_tokenizer, read_stage_manifest, resolve_precision
from align.recipe import STAGE_SCHEMAS, ModelConfig, StageConfig


def stage_config(folder: Path) -> StageConfig:
    raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    return STAGE_SCHEMAS[raw["kind"]].model_validate(raw)


def load_trained(folder: str | Path, dequantize: bool = False, precision: str | None = None):
    """(model, tokenizer) from a finished stage folder or a plain model folder.

    The base is loaded as it was trained (4-bit for QLoRA). ``dequantize=True`` then turns the
    4-bit layers back into ordinary ones holding exactly the dequantized weights the adapter was
    trained against: what merging needs.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
            raise FileNotFoundError(f"{folder}: this stage has not finished (no manifest.json); resume it with --resume")
        # A plain transformers folder (a merged export, a converted GGUF).
        tokenizer = load_tokenizer(ModelConfig(name=str(folder)), folder)
        return AutoModelForCausalLM.from_pretrained(folder), tokenizer
    manifest = read_stage_manifest(folder)
    if manifest.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: the stage did not finish (status {manifest.get('status')!r})")
    cfg = stage_config(folder)
    precision = precision or manifest.get("precision") or resolve_precision(cfg.model.precision)
    artifact = folder / manifest["artifact"]
    tokenizer = load_tokenizer(cfg.model, artifact)
    if manifest["artifact"] == "model":
        return AutoModelForCausalLM.from_pretrained(artifact, dtype=DTYPES[precision]), tokenizer
    from peft import PeftModel

    base = load_base_model(cfg.model, cfg.quantization, precision, Path(manifest["base_model_path"]))
    if dequantize and getattr(base, "is_quantized", False):
        base = base.dequantize()
    model = PeftModel.from_pretrained(base, artifact)
    model.eval()
    return model, tokenizer


def merge(folder: str | Path, output: str | Path, precision: str = "fp32") -> Path:
    """Merge a stage's adapter into its base and save a safetensors folder plain transformers loads.

    For QLoRA the deltas are added to the dequantized NF4 weights the adapter was trained with,
    so the merged model computes what the trained model computed (not the original weights
    plus deltas learned against different ones). Merged in fp32, then saved in ``precision``.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another --output")
    model, tokenizer = load_trained(folder, dequantize=True, precision="fp32")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(DTYPES[precision])
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output
