"""Adapters through peft: one recipe section picks the method, the LoRA section its sizes."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from align.config import AdapterConfig, LoraConfig, RecipeError
from align.models.loading import disable_bnb_cpu_repacking
from align.models.modes import evaluating


def peft_config(adapter: AdapterConfig, lora: LoraConfig, total_steps: int = 1000, task_type: str = "CAUSAL_LM"):
    """The peft config for ``adapter.method``; ``adapter.options`` go straight to peft."""
    import peft

    targets = adapter.target_modules
    options = dict(adapter.options)
    method = adapter.method
    if method == "lora":
        return peft.LoraConfig(
            task_type=task_type,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            **options,
        )
    if method == "adalora":
        options.setdefault("total_step", total_steps)  # AdaLoRA's rank budget schedule runs over the whole training
        return peft.AdaLoraConfig(
            task_type=task_type,
            init_r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            **options,
        )
    if method == "ia3":
        return peft.IA3Config(
            task_type=task_type,
            target_modules=targets,
            feedforward_modules=options.pop("feedforward_modules", []),
            **options,
        )
    if method == "vera":
        return peft.VeraConfig(
            task_type=task_type, r=lora.r, target_modules=targets, vera_dropout=lora.dropout, **options
        )
    if method == "loha":
        return peft.LoHaConfig(task_type=task_type, r=lora.r, alpha=lora.alpha, target_modules=targets, **options)
    if method == "lokr":
        return peft.LoKrConfig(task_type=task_type, r=lora.r, alpha=lora.alpha, target_modules=targets, **options)
    if method == "oft":
        options.setdefault("r", 0)
        options.setdefault("oft_block_size", 8)
        return peft.OFTConfig(task_type=task_type, target_modules=targets, **options)
    raise ValueError(f"adapter.method {method!r} has no peft config (full fine-tuning trains the base itself)")


def checkpoint_layers(model, share: bool | float) -> None:
    """Recompute the activations of ``share`` of the decoder layers in backward (True = all), spread
    evenly (layer i when floor((i + 1) share) > floor(i share)): memory and time between none and all.
    Non-reentrant, as the reentrant kind breaks with frozen inputs and under DDP. transformers' decoder
    layers each honour their own ``gradient_checkpointing`` flag, so a share is set layer by layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not share:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):  # some remote-code models
        from align.console import console

        console.print(
            f"[yellow]{type(model).__name__} does not support gradient checkpointing: training without it "
            "(more memory; set train.gradient_checkpointing: false to silence this)[/]"
        )
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if share is True or share >= 1:
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = math.floor((i + 1) * share) > math.floor(i * share)


def _prepare_for_training(model, quantized: bool, gradient_checkpointing: bool | float):
    """Frozen-base setup before an adapter wraps the model: kbit preparation for a quantized base,
    and activation checkpointing (``checkpoint_layers``)."""
    import peft

    if quantized:
        disable_bnb_cpu_repacking(model)  # also done by load_base_model; a caller may bring its own model
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    checkpoint_layers(model, gradient_checkpointing)
    return model


def add_adapter(
    model,
    adapter: AdapterConfig,
    lora: LoraConfig,
    quantized: bool,
    gradient_checkpointing: bool | float,
    total_steps: int = 1000,
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` with a fresh trainable adapter (or leave it whole for full fine-tuning)."""
    import peft

    if adapter.method == "full":
        if quantized:
            raise RecipeError("adapter.method=full cannot train a quantized base; set quantization.mode=none")
        checkpoint_layers(model, gradient_checkpointing)
        return model
    model = _prepare_for_training(model, quantized, gradient_checkpointing)
    try:
        config = peft_config(adapter, lora, total_steps, task_type)
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError) as exc:  # no module matched target_modules, an unknown option, ...
        raise RecipeError(
            f"adapter ({adapter.method}, target_modules={adapter.target_modules}, options={adapter.options}): {exc}"
        ) from None


def start_from_adapter(model, adapter_dir: Path) -> int:
    """Copy a saved adapter's weights into ``model``'s fresh adapter of the same shape, by module name:
    a reward model (SEQ_CLS) started from a policy's adapter (CAUSAL_LM) of the same base, whose
    layers are named alike; what the saved adapter lacks (the new scalar head) stays as it was.
    peft loads an adapter only into a model of its own task, so the weights are copied here.
    Returns how many tensors were copied; an adapter of another shape is an error naming both."""
    import json

    from safetensors.torch import load_file

    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    mine = model.peft_config["default"].to_dict()

    def shape(config: dict) -> tuple:
        modules = config.get("target_modules") or []
        return (
            str(config.get("peft_type")).rsplit(".", 1)[-1],  # "LORA" saved, PeftType.LORA in memory
            config.get("r"),
            config.get("lora_alpha"),
            modules if isinstance(modules, str) else tuple(sorted(modules)),
        )

    theirs, ours = shape(saved_config), shape(mine)
    if theirs != ours:
        differ = [name for name, a, b in zip(("type", "r", "alpha", "target modules"), theirs, ours) if a != b]
        raise RecipeError(
            f"{adapter_dir}: its adapter cannot start this one - they differ in {', '.join(differ)} "
            f"({', '.join(f'{theirs[i]} vs {ours[i]}' for i in range(3) if theirs[i] != ours[i]) or 'modules'}); "
            "give this stage the adapter and lora sections of the stage it starts from"
        )
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    # By hand: peft's set_peft_model_state_dict insists on the task's modules_to_save (the head), which a
    # policy's adapter does not have. Saved names are the parameter names without the adapter's name.
    params = {name.replace(".default.", "."): p for name, p in model.named_parameters() if ".default." in name}
    unmatched = sorted(set(saved) - set(params))
    if unmatched:
        raise RecipeError(f"{adapter_dir}: {len(unmatched)} weights match no layer of this model, e.g. {unmatched[0]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))
    return len(saved)


def load_adapter_for_training(
    model, adapter_dir: Path, quantized: bool, gradient_checkpointing: bool | float, frozen_copy: str | None = None
):
    """Continue training a saved adapter (``from: sft``); optionally keep a frozen copy of it,
    named ``frozen_copy``, as a reference policy that shares the one base in memory."""
    import peft

    model = _prepare_for_training(model, quantized, gradient_checkpointing)
    model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    if frozen_copy:
        model.load_adapter(str(adapter_dir), adapter_name=frozen_copy, is_trainable=False)
        model.set_adapter("default")
    return model


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates rank from the gradients after each optimizer step; the Trainer does not
    know to ask for it, so this callback does (peft: `update_and_allocate` before zero_grad)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def trainable_summary(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@contextmanager
def reference_mode(model, adapter_name: str | None):
    """The reference policy, in eval mode (no dropout): a named frozen adapter, or adapters off."""
    with evaluating(model):
        if adapter_name is None:
            with model.disable_adapter():
                yield
        else:
            previous = model.active_adapter
            model.set_adapter(adapter_name)
            try:
                yield
            finally:
                model.set_adapter(previous)
