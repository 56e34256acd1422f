"""The maths of alignment as small pure functions. Shapes: B = pairs in the batch, T = tokens, V = vocabulary.

Preference losses take per-sequence summed log-probabilities of the completion tokens under
the policy (``policy_chosen``, ``policy_rejected``: [B]) and, when the loss needs one, under the
reference (``ref_chosen``, ``ref_rejected``: [B]), and return the per-pair loss [B].
The variants are chosen by ``PreferenceLoss`` (open-instruct style), which says what each needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F

from align.data.templating import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over labelled positions, and the number of labelled positions.

    logits: [N, T, V] predicting the token at t+1 from position t (already aligned with ``labels``
    shifted by one, see ``shifted``); labels: [N, T] with IGNORE_INDEX where not scored.
    Log-softmax is taken one row at a time in fp32, so [N, T, V] is never held in fp32 at once.
    Returns ([N], [N]).
    """
    sums, counts = [], []
    for row_logits, row_labels in zip(logits, labels):
        mask = row_labels != IGNORE_INDEX
        scored = row_logits[mask].float()  # [n, V]: only the positions that count
        picked = scored.gather(-1, row_labels[mask].unsqueeze(-1)).squeeze(-1)
        sums.append((picked - torch.logsumexp(scored, dim=-1)).sum())
        counts.append(mask.sum())
    return torch.stack(sums), torch.stack(counts)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] at every position: [N, T, V], [N, T] -> [N, T].

    The temperature is the sampler's (1 for greedy, which samples nothing), so the trainer's
    logprobs mean what the rollout engine's mean (RELIABILITY 15). One row at a time in fp32.
    """
    scale = 1.0 if temperature == 0 else temperature
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        scaled = row_logits.float() / scale
        rows.append(scaled.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def dpo_sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing > 0, conservative DPO (cDPO):

        h = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    At the start (policy == reference) h = 0 and the loss is ln 2.
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def dpo_robust(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate eps < 0.5.

        loss = ((1 - eps) * -log sigmoid(h) - eps * -log sigmoid(-h)) / (1 - 2 eps)
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (1 - 2 * label_smoothing)


def ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, chosen_tokens=None, rejected_tokens=None, **_) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token average log-ratios (as the IPO authors and TRL do):

        h = (pi_c - ref_c) / |c| - (pi_r - ref_r) / |r|;   loss = (h - 1 / (2 beta))^2
    """
    h = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (policy_rejected - ref_rejected) / rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def simpo(policy_chosen, policy_rejected, beta: float, gamma: float = 0.5, chosen_tokens=None, rejected_tokens=None, **_) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin gamma.

        loss = -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)
    """
    margin = policy_chosen / chosen_tokens.clamp(min=1) - policy_rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma)


def bradley_terry(chosen_scores, rejected_scores, margin=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Bradley-Terry pairwise loss for reward models (Ouyang et al. 2022, eq. 1), per pair [B]:

        d = r_c - r_r - m;   loss = -(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d)

    ``margin`` m [B] (optional) asks for a larger gap on clearly better pairs (Llama 2).
    """
    d = chosen_scores - rejected_scores - (margin if margin is not None else 0.0)
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


@dataclass(frozen=True)
class _Loss:
    function: Callable[..., torch.Tensor]
    needs_reference: bool


class PreferenceLoss(Enum):
    """`dpo.loss` in a recipe. cdpo is sigmoid with label smoothing; robust needs label_smoothing too."""

    sigmoid = _Loss(dpo_sigmoid, needs_reference=True)
    cdpo = _Loss(dpo_sigmoid, needs_reference=True)
    robust = _Loss(dpo_robust, needs_reference=True)
    ipo = _Loss(ipo, needs_reference=True)
    simpo = _Loss(simpo, needs_reference=False)

    @property
    def needs_reference(self) -> bool:
        return self.value.needs_reference

    def __call__(self, **kwargs) -> torch.Tensor:
        return self.value.function(**kwargs)


LN2 = math.log(2.0)
