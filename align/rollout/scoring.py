"""The trainer's view of sampled tokens: batches of rollouts and their per-token logprobs.

Prompts are left-padded and completions right-padded, so every completion starts in the same
column and the logits of all completion tokens come from one ``logits_to_keep`` slice. Position
ids are counted from each row's first real token, so left padding changes nothing (RELIABILITY 5,
which GPT-2's learned positions would expose).
"""

from __future__ import annotations

import torch

from align.models.loading import autocast
from align.models.modes import evaluating
from align.models.output_layer import next_token_logps
from align.rollout.engine import Rollout
from align.tokens import IGNORE_INDEX


def rollout_batch(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/position_ids [B, P + C]; completion_ids/completion_mask [B, C]."""
    prompt_len = max(len(r.prompt_ids) for r in rollouts)
    completion_len = max(len(r.completion_ids) for r in rollouts)
    ids, mask, completions, completion_mask = [], [], [], []
    for r in rollouts:
        left = prompt_len - len(r.prompt_ids)
        right = completion_len - len(r.completion_ids)
        ids.append([pad_id] * left + r.prompt_ids + r.completion_ids + [pad_id] * right)
        mask.append([0] * left + [1] * (len(r.prompt_ids) + len(r.completion_ids)) + [0] * right)
        completions.append(r.completion_ids + [pad_id] * right)
        completion_mask.append([1] * len(r.completion_ids) + [0] * right)
    attention_mask = torch.tensor(mask)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_ids": torch.tensor(completions),
        "completion_mask": torch.tensor(completion_mask),
    }


def completion_forward(model, batch: dict[str, torch.Tensor]):
    """The trainer's full next-token distribution over a rollout's completion: (logits [B, C, V], position
    t predicting completion token t; the model's output), for the views that need every logit (the vLLM
    greedy check's near-ties, the checkup's KL). Logits are kept for the completion columns only, so the
    prompt's [P, V] logits are never made. Logprobs of the sampled tokens come from ``policy_outputs``."""
    completion_len = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=completion_len + 1,
        use_cache=False,
    )
    return out.logits[:, :-1], out


def policy_outputs(model, batch: dict[str, torch.Tensor], temperature: float, value_head=None, entropy: bool = False):
    """(logprobs [B, C], entropy [B, C] or None, values [B, C] or None) of the completion tokens.

    The one trainer-logprob function: the RL losses, the rescoring of an engine's samples and the
    vLLM sync probe all read the trainer's logprobs through it, so the probe verifies what the losses use.

    Values are read from the final hidden state at the position that predicts each token: V_t is
    the value of the state before token t is generated. Only the completion tokens' logits are made,
    a chunk at a time (``next_token_logps``).
    """
    mask = batch["completion_mask"]
    logps, entropies, hidden = next_token_logps(
        model,
        batch["completion_ids"].masked_fill(mask == 0, IGNORE_INDEX),
        temperature,
        entropy=entropy,
        hidden=value_head is not None,
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    )
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1) * mask
    return logps, entropies, values


def completion_token_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Per-token logprobs of the completion tokens, [B, C] (0 where completion_mask is 0): ``policy_outputs``'s."""
    return policy_outputs(model, batch, temperature)[0]


@torch.no_grad()
def score_rollouts(
    model, rollouts: list[Rollout], pad_id: int, temperature: float, precision: str = "fp32", batch_size: int = 16
) -> list[list[float]]:
    """The trainer's logprobs of each rollout's completion tokens, in eval mode (no dropout)."""
    device = next(model.parameters()).device
    out = []
    with evaluating(model):
        for start in range(0, len(rollouts), batch_size):
            chunk = rollouts[start : start + batch_size]
            batch = {k: v.to(device) for k, v in rollout_batch(chunk, pad_id).items()}
            with autocast(precision):
                logps = completion_token_logps(model, batch, temperature)
            out += [row[: len(r.completion_ids)].tolist() for row, r in zip(logps.float().cpu(), chunk)]
    return out


@torch.no_grad()
def trainer_view(
    model, rollouts: list[Rollout], pad_id: int, precision: str, near_tie: float
) -> tuple[list[list[float]], float]:
    """(the trainer's logprobs of each rollout's tokens at temperature 1, the share of tokens that are
    the trainer's most likely one or within ``near_tie`` nats of it) - for checking an engine's greedy answers."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in rollout_batch(rollouts, pad_id).items()}
    with evaluating(model), autocast(precision):
        logits = completion_forward(model, batch)[0]
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    close = (logp.max(-1).values - chosen) <= near_tie
    mask = batch["completion_mask"].bool()
    agreement = (close & mask).sum().item() / max(mask.sum().item(), 1)
    return [row[: len(r.completion_ids)].cpu().tolist() for row, r in zip(chosen, rollouts)], agreement


def logprob_mismatch(engine: list[list[float]], trainer: list[list[float]]) -> dict[str, float]:
    """How far the sampler's logprobs are from the trainer's: mean and max |difference| per token."""
    diffs = torch.tensor([abs(a - b) for e, t in zip(engine, trainer) for a, b in zip(e, t)] or [0.0])
    return {"logprob_mismatch_mean": diffs.mean().item(), "logprob_mismatch_max": diffs.max().item()}
