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

LN2 = math.log(2.0)


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


# logits of at most this many bytes (fp32) exist at once in ``linear_token_logps``: 64 MiB, 341 positions
# of a 49k vocabulary. Small enough to vanish beside a model's activations, large enough for fast matmuls.
CHUNK_BYTES = 64 * 2**20


def autocast_weight(weight: torch.Tensor, device_type: str) -> torch.Tensor:
    """``weight`` in the dtype autocast would compute with on ``device_type`` (itself where autocast is off)."""
    if torch.is_autocast_enabled(device_type) and weight.is_floating_point():
        return weight.to(torch.get_autocast_dtype(device_type))
    return weight


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] over chunks of positions, with the gradient taken in the forward.

    Written here because no library we use has it for a CPU (Liger's fused linear cross-entropy is
    Triton, GPU only): for each chunk the logits are made, reduced to the target's logprob (and the
    entropy) and dropped, and d logp / d h = (onehot - softmax) W / temperature is computed at once,
    so backward is one multiply and no [N, V] tensor is ever stored. Only h receives a gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # The matmuls in the ambient precision (bf16 under autocast), the softmax in fp32, as the model's own loss.
        # The weight is cast once here: autocast copies a frozen weight again at every use (it caches only weights
        # that require a gradient), twice a chunk: for SmolLM2's fp32 [49152, 576] output layer that was 7 copies
        # a forward and backward, now 1 (BENCHMARKS.md).
        weight = autocast_weight(weight, hidden.device.type)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk].unsqueeze(-1)
            logp = (F.linear(h, weight, bias).float() / temperature).log_softmax(-1)  # [n, V]
            logps[start : start + chunk] = logp.gather(-1, t).squeeze(-1)
            p = logp.exp()
            if with_entropy:
                entropy[start : start + chunk] = -(p * logp).sum(-1)
            del logp
            if grad is not None:
                onehot_minus_p = p.neg_().scatter_add_(-1, t, torch.ones_like(t, dtype=p.dtype)) / temperature
                grad[start : start + chunk] = (onehot_minus_p.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        (grad,) = ctx.saved_tensors
        return grad * grad_logps.unsqueeze(-1).to(grad.dtype), None, None, None, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    entropy: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax((hidden W^T + b) / temperature)[target] without holding the [N, V] logits.

    hidden: [N, H] final hidden states of the positions that are scored (labelled ones only, so the
    prompt and the padding cost nothing); weight: [V, H] the output layer's, frozen (no gradient
    reaches it); targets: [N]. Returns (logps [N] fp32, with a gradient to ``hidden``; entropy [N] of
    the same distribution, no gradient, or None). Equal to ``token_logps`` on the full logits (test).
    """
    if weight.requires_grad:
        raise ValueError("linear_token_logps: the output layer's weight must be frozen (its gradient is not computed)")
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    scale = 1.0 if temperature == 0 else float(temperature)
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, scale, chunk, entropy)


def dpo_sigmoid(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing > 0, conservative DPO (cDPO):

        h = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    At the start (policy == reference) h = 0 and the loss is ln 2.
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def dpo_robust(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate eps < 0.5.

    loss = ((1 - eps) * -log sigmoid(h) - eps * -log sigmoid(-h)) / (1 - 2 eps)
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (1 - 2 * label_smoothing)


def ipo(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, chosen_tokens=None, rejected_tokens=None, **_
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token average log-ratios (as the IPO authors and TRL do):

    h = (pi_c - ref_c) / |c| - (pi_r - ref_r) / |r|;   loss = (h - 1 / (2 beta))^2
    """
    h = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (
        policy_rejected - ref_rejected
    ) / rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def simpo(
    policy_chosen, policy_rejected, beta: float, gamma: float = 0.5, chosen_tokens=None, rejected_tokens=None, **_
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin gamma.

    loss = -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)
    """
    margin = policy_chosen / chosen_tokens.clamp(min=1) - policy_rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012: expm1 near 0, log1p further out)."""
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens) -> torch.Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, eq. 4-6) on per-token mean log-probabilities m, in fp32:
    log odds(y) = log(p / (1 - p)) with p = exp(m), so log OR = (m_c - m_r) - (log(1 - p_c) - log(1 - p_r))."""
    chosen = policy_chosen.float() / chosen_tokens.clamp(min=1)
    rejected = policy_rejected.float() / rejected_tokens.clamp(min=1)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo(policy_chosen, policy_rejected, beta: float, chosen_tokens=None, rejected_tokens=None, **_) -> torch.Tensor:
    """ORPO's odds-ratio term (eq. 7), per pair: loss = -beta * log sigmoid(log OR). Reference-free; the
    stage adds the SFT loss on the chosen answers (``PreferenceTrainer``), which is the other half of ORPO."""
    return -beta * F.logsigmoid(orpo_log_odds(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens))


def kto(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7-8) on unpaired answers, per example [B]:

        r = pi(y|x) - ref(y|x) (summed logprobs);  z0 = the KL estimate (detached, >= 0)
        desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

    ``desirable`` [B] bool. At the start (policy == reference, z0 = 0) every term is half its weight.
    """
    r = policy - ref
    value = torch.where(desirable, r - kl, kl - r)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)
    return weight * (1 - torch.sigmoid(beta * value))


def bradley_terry(chosen_scores, rejected_scores, margin=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Bradley-Terry pairwise loss for reward models (Ouyang et al. 2022, eq. 1), per pair [B]:

        d = r_c - r_r - m;   loss = -(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d)

    ``margin`` m [B] (optional) asks for a larger gap on clearly better pairs (Llama 2).
    """
    d = chosen_scores - rejected_scores - (margin if margin is not None else 0.0)
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


@dataclass(frozen=True)
class _Loss:
    name: str  # part of the value: two losses sharing a function (sigmoid, cdpo) stay two members, not an alias
    function: Callable[..., torch.Tensor]
    needs_reference: bool


class PreferenceLoss(Enum):
    """`dpo.loss` in a recipe. cdpo is sigmoid with label smoothing; robust needs label_smoothing too."""

    sigmoid = _Loss("sigmoid", dpo_sigmoid, needs_reference=True)
    cdpo = _Loss("cdpo", dpo_sigmoid, needs_reference=True)
    robust = _Loss("robust", dpo_robust, needs_reference=True)
    ipo = _Loss("ipo", ipo, needs_reference=True)
    simpo = _Loss("simpo", simpo, needs_reference=False)
    orpo = _Loss("orpo", orpo, needs_reference=False)  # the orpo stage's; dpo.loss does not offer it

    @property
    def needs_reference(self) -> bool:
        return self.value.needs_reference

    def __call__(self, **kwargs) -> torch.Tensor:
        return self.value.function(**kwargs)


# --- Online RL --------------------------------------------------------------------------------
# Shapes: B = sampled completions, T = completion tokens; ``mask`` [B, T] is 1 on real tokens.


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over everything, or along ``dim``); 0 where nothing counts."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries. One entry or a constant: the std term is skipped
    (dividing by ~0 would blow up), so the result stays finite. With shift_mean=False the mean is
    added back (reward whitening that keeps the reward's sign, as in the RLHF PPO write-ups)."""
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * count / (count - 1) if count > 1 else torch.zeros((), dtype=x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps) if var > eps else x - mean
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy (Schulman 2020):

        k1 = log p - log q          unbiased, can be negative per token
        k2 = (log p - log q)^2 / 2  biased, low variance
        k3 = q/p - 1 - log(q/p)     unbiased, always >= 0 (DeepSeekMath uses it in the GRPO loss)

    p = policy, q = reference; [B, T] -> [B, T]. All three are exactly 0 when p == q.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator must be k1, k2 or k3, not {estimator!r}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over each completion:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    rewards, values, mask: [B, T] (completion tokens left-aligned). Returns (advantages, returns), [B, T].
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each completion's reward minus its group's mean, divided by the
    group's std when ``scale`` (Dr. GRPO drops the division). Groups are consecutive
    ``group_size`` entries of rewards [B]. A group with identical rewards gets exactly 0."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): reward minus the mean reward of the other k-1 samples of the
    same prompt, = k/(k-1) * (r - group mean). rewards [B] in consecutive groups -> [B]."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - old_logp);  loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    logp, old_logp: [B, T]; advantages [B, T] (or [B, 1], broadcast). Returns (loss [B, T],
    clipped [B, T]: 1 where the clipped term was the one taken)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def truncated_importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; TRL's and veRL's correction for vLLM rollouts).

    Tokens were drawn from the sampler's distribution (an inference engine: other kernels, other
    precision), not the trainer's. Weighting each token's policy-gradient term by
    pi_trainer / pi_sampler makes the estimate the trainer's own; capping the weight at ``cap``
    bounds its variance (at the price of a small bias where the cap binds):

        w = min(exp(trainer_logp - sampler_logp), cap)      (no gradient: a constant per token)

    trainer_logp, sampler_logp: [B, T] log-probabilities of the sampled tokens under the trainer's
    rollout policy and under the sampler. Returns (w [B, T], truncated [B, T]: 1 where the cap bound).
    """
    ratio = torch.exp((trainer_logp - sampler_logp).detach())
    return ratio.clamp(max=cap), (ratio > cap).float()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss with the value change clipped to +-clip around the rollout's values:
    0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2). [B, T] each -> (loss [B, T], clipped [B, T])."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float()


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 x mean squared log-ratio over real tokens: [B, T] x2, [B, T] -> scalar. How far an update
    moved the policy from the one that sampled (a logged diagnostic, and PPO's early stop)."""
    return masked_mean(0.5 * (logp - old_logp) ** 2, mask)


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's rewards per token: -kl_coef x KL on every token, plus the completion's score on its last
    real token. kl, mask: [B, T]; scores: [B] -> [B, T]."""
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def aggregate_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    rows_in_minibatch: int,
    tokens_in_minibatch: int,
    max_new_tokens: int,
) -> torch.Tensor:
    """This micro-batch's share of the minibatch loss, so micro-batches add up to the exact
    minibatch loss whatever the split (the denominators are the whole minibatch's).

    token_losses, mask: [b, T] for the micro-batch's b rows. how: token (sum / tokens in the
    minibatch, DAPO), sequence (each row's mean, summed / rows, GRPO paper), or constant
    (sum / (rows x max_new_tokens), Dr. GRPO). Returns a scalar."""
    if how == "token":
        return (token_losses * mask).sum() / tokens_in_minibatch
    if how == "sequence":
        return ((token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows_in_minibatch
    return (token_losses * mask).sum() / (rows_in_minibatch * max_new_tokens)


class KLController:
    """kl_coef fixed, or adapted towards target_kl (Ziegler et al. 2019, section 2.2):
    coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * completions / horizon."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl_per_completion: float, completions: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl_per_completion / self.target - 1))
            self.coef *= 1 + error * completions / self.horizon


class RunningScale:
    """Running std of scores (Welford), to normalise them across steps."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        for v in values.tolist():
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens; 1 is a perfect critic."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return (1 - var_residual / var).item() if var > 0 else float("nan")


def importance_stats(weights: torch.Tensor, truncated: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The weights' mean, max and truncated share over completion tokens, for the step's log."""
    return {
        "is_weight_mean": masked_mean(weights, mask).item(),
        "is_weight_max": weights[mask.bool()].max().item() if mask.any() else 1.0,
        "is_truncated_fraction": masked_mean(truncated, mask).item(),
    }
