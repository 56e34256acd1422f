"""The output layer, bypassed: a causal LM's final hidden states without its [B, T, V] logits.

A language model's loss only needs the logits of the positions that are scored (the completion
tokens), and only one of each position's V logits; transformers computes all of them, over the
prompt and the padding too, and the cross-entropy keeps an fp32 copy for backward. For a 49k
vocabulary that is the largest tensor of a small model's step. ``final_hidden`` runs the model's own
forward (through DDP, peft and gradient checkpointing unchanged) but hands its output layer an empty
slice, and keeps what the layer would have read; ``linear_token_logps`` (align/losses.py) then scores
the chosen positions chunk by chunk.

Only for models whose logits are exactly ``lm_head(hidden)``: a frozen plain Linear output layer
and no logit soft-capping or scaling in the config (Gemma 2's soft-cap, Cohere's and Granite's
scales would be skipped). ``output_layer`` says None otherwise and the caller uses the logits.
``ALIGN_FULL_LOGITS=1`` in the environment says None always: the benchmarks' baseline (scripts/bench_*.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from align.losses import linear_token_logps, token_logps
from align.tokens import IGNORE_INDEX

# config attributes that change logits after the output layer; a model with any of them set is not bypassed
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_layer(model) -> torch.nn.Linear | None:
    """The model's output layer when its logits are exactly ``layer(final hidden)``, else None."""
    if os.environ.get("ALIGN_FULL_LOGITS") == "1":
        return None
    unwrapped = getattr(model, "module", model)  # DDP
    get = getattr(unwrapped, "get_output_embeddings", None)
    layer = get() if get else None
    if type(layer) is not torch.nn.Linear or layer.weight.requires_grad:  # an adapter on it, or trained in full
        return None
    config = getattr(unwrapped, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return layer


class _Captured:
    hidden: torch.Tensor | None = None


@contextmanager
def final_hidden(model, layer: torch.nn.Linear):
    """Within the block, the model's forward computes logits for no position (shape [B, 0, V]) and
    ``captured.hidden`` holds what its output layer was given: [B, T', H], T' = the kept positions."""
    captured = _Captured()

    # The layer's forward itself is replaced, not fed an empty slice by a pre-hook: under autocast even an
    # empty matmul copies the whole weight in the autocast dtype (a frozen one is not cached; SmolLM2's fp32
    # [49152, 576]: 0.11 GB read at every forward). An instance attribute, as accelerate's hooks set theirs:
    # whatever was there is put back.
    def skip(hidden):
        captured.hidden = hidden
        # empty, yet on the graph: DDP with find_unused_parameters searches it from the model's outputs
        return hidden[..., :0, :1].expand(*hidden.shape[:-2], 0, layer.out_features)

    wrapped = layer.__dict__.get("forward")
    layer.forward = skip
    try:
        yield captured
    finally:
        if wrapped is None:
            del layer.forward
        else:
            layer.forward = wrapped


def next_token_logps(
    model, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False, hidden: bool = False, **inputs
):
    """The model's logprobs of ``targets`` [B, K]: targets[:, k] is the token after the k-th of the
    input's last K + 1 positions; IGNORE_INDEX where a position is not scored (0 in the result).

    ``inputs`` go to the model's forward (input_ids, attention_mask, position_ids). Returns (logps
    [B, K] fp32, entropy [B, K] fp32 without gradient or None, final hidden states [B, K, H] or None).
    Through the bypassed output layer where the model allows it (only the scored positions' logits
    exist, a chunk at a time), else through the model's logits, with the same result.
    """
    keep = targets.shape[1] + 1
    inputs = {**inputs, "use_cache": False}  # a collator may say so too (PackedCollator)
    scored = targets != IGNORE_INDEX
    layer = output_layer(model)
    if layer is None:
        out = model(**inputs, logits_to_keep=keep, output_hidden_states=hidden)
        logits = out.logits[:, :-1]
        logps = token_logps(logits, targets.clamp(min=0), temperature) * scored
        entropies = None
        if entropy:
            with torch.no_grad():
                scaled = logits.float() / (temperature or 1.0)
                entropies = torch.stack([-(r.softmax(-1) * r.log_softmax(-1)).sum(-1) for r in scaled]) * scored
        return logps, entropies, out.hidden_states[-1][:, -keep:-1] if hidden else None
    with final_hidden(model, layer) as captured:
        model(**inputs, logits_to_keep=keep)
    states = captured.hidden[:, :-1]  # [B, K, H]
    picked, picked_entropy = linear_token_logps(
        states[scored], layer.weight, targets[scored], temperature, layer.bias, entropy=entropy
    )
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device).masked_scatter(scored, picked)
    entropies = None
    if entropy:
        entropies = torch.zeros_like(logps).masked_scatter(scored, picked_entropy)
    return logps, entropies, states if hidden else None
