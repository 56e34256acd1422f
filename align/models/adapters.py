"""Adapters through peft: one recipe section picks the method, the LoRA section its sizes."""

from __future__ import annotations

from align.models.loading import keep_4bit_layers_differentiable
from align.recipe import AdapterConfig, LoraConfig


def peft_config(adapter: AdapterConfig, lora: LoraConfig):
    """The peft config for ``adapter.method``; ``adapter.options`` go straight to peft."""
    import peft

    targets = adapter.target_modules
    options = dict(adapter.options)
    method = adapter.method
    if method == "lora":
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            **options,
        )
    if method == "adalora":
        options.setdefault("total_step", 1000)  # peft requires it; the trainer overrides nothing here
        return peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, **options)
    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=options.pop("feedforward_modules", []), **options)
    if method == "vera":
        return peft.VeraConfig(task_type="CAUSAL_LM", r=lora.r, target_modules=targets, vera_dropout=lora.dropout, **options)
    if method == "loha":
        return peft.LoHaConfig(task_type="CAUSAL_LM", r=lora.r, alpha=lora.alpha, target_modules=targets, **options)
    if method == "lokr":
        return peft.LoKrConfig(task_type="CAUSAL_LM", r=lora.r, alpha=lora.alpha, target_modules=targets, **options)
    if method == "oft":
        options.setdefault("r", 0)
        options.setdefault("oft_block_size", 8)
        return peft.OFTConfig(task_type="CAUSAL_LM", target_modules=targets, **options)
    raise ValueError(f"adapter.method {method!r} has no peft config (full fine-tuning trains the base itself)")


def add_adapter(model, adapter: AdapterConfig, lora: LoraConfig, quantized: bool, gradient_checkpointing: bool):
    """Wrap ``model`` with a fresh trainable adapter (or leave it whole for full fine-tuning)."""
    import peft

    if adapter.method == "full":
        if quantized:
            raise ValueError("adapter.method=full cannot train a quantized base; set quantization.mode=none")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    if quantized:
        keep_4bit_layers_differentiable(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config(adapter, lora))


def trainable_summary(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
