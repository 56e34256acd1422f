"""What a model's attention takes: whether it can read SharedPromptCollator's rows (one prompt, both
answers, a 4D mask keeping them apart) exactly, and a batch's mask in the form its attention wants."""

from __future__ import annotations

import torch

from align.models.unwrap import inner_model


def shared_prompt_obstacle(model) -> str:
    """Why ``model`` cannot take SharedPromptCollator's rows as they are, or ''. It must be one of
    transformers' own classes (remote code may ignore a custom mask or position ids), attend with sdpa or
    eager (flash-attention kernels take no mask), and have only full-attention layers: sliding-window and
    chunked layers would lose their window, and recurrent, convolutional or linear-attention layers (Mamba,
    LFM2, Qwen3-Next, ...) mix tokens in row order, where the rejected answer follows the chosen one."""
    base = inner_model(model)
    config = base.config
    if not type(base).__module__.startswith("transformers."):
        return "a model class from outside transformers may not honour a custom mask"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"{implementation} attention takes no custom mask"
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return f"its {', '.join(sorted(kinds - {'full_attention'}))} layers would see across the answers"
    if not kinds and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "its sliding window would be lost under a custom mask"
    return ""


def mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A batch's attention mask as ``model``'s attention takes it: a boolean 4D mask becomes the additive
    float mask eager attention adds to its scores (sdpa takes booleans); anything else is unchanged."""
    if mask.ndim != 4 or mask.dtype != torch.bool or inner_model(model).config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )
