"""Win-rate maths as pure functions. Shapes: N = prompts; every array is [N], one entry per prompt.

An outcome is the policy's result against the baseline on one prompt: 1 win, 0.5 tie, 0 loss.
The win-rate is their mean (ties count half), with a bootstrap 95% interval over prompts, and a
length-controlled win-rate (Dubois et al. 2024, "Length-Controlled AlpacaEval") that asks what
the win-rate would be if the policy's answers were as long as the baseline's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

WIN, TIE, LOSS = 1.0, 0.5, 0.0


def outcomes_from_scores(policy: Sequence[float], baseline: Sequence[float], tie_margin: float = 0.0) -> np.ndarray:
    """Per prompt: win when policy - baseline > tie_margin, loss when < -tie_margin, else tie. [N], [N] -> [N]."""
    diff = np.asarray(policy, dtype=float) - np.asarray(baseline, dtype=float)
    return np.where(diff > tie_margin, WIN, np.where(diff < -tie_margin, LOSS, TIE))


def outcomes_from_probabilities(p_policy_wins: Sequence[float]) -> np.ndarray:
    """A pairwise judge's P(policy's answer is better): > 0.5 win, < 0.5 loss, exactly 0.5 tie. [N] -> [N]."""
    p = np.asarray(p_policy_wins, dtype=float)
    return np.where(p > 0.5, WIN, np.where(p < 0.5, LOSS, TIE))


def counts(outcomes: Sequence[float]) -> tuple[int, int, int]:
    """(wins, ties, losses)."""
    o = np.asarray(outcomes, dtype=float)
    return int((o == WIN).sum()), int((o == TIE).sum()), int((o == LOSS).sum())


def win_rate(outcomes: Sequence[float]) -> float:
    """mean(outcomes) = (wins + ties / 2) / N."""
    return float(np.mean(outcomes))


def bootstrap_interval(outcomes: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the win-rate: resample the N prompts with replacement
    ``resamples`` times (seeded), take the 2.5th and 97.5th percentiles of the resampled means."""
    o = np.asarray(outcomes, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(o), size=(resamples, len(o)))
    means = o[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def length_feature(policy_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> np.ndarray:
    """AlpacaEval 2's length term: tanh(d / std(d)) with d = policy length - baseline length. [N] -> [N].

    When d does not vary (std 0, e.g. all lengths equal) length cannot be told apart from the
    intercept, so the feature is 0 and the length-controlled win-rate is the raw one.
    """
    d = np.asarray(policy_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    std = d.std()
    return np.tanh(d / std) if std > 0 else np.zeros_like(d)


def fit_length_model(
    outcomes: Sequence[float], feature: Sequence[float], l2: float = 0.1, steps: int = 100
) -> tuple[float, float]:
    """(intercept a, slope b) of the fractional-label logistic regression P(win) = sigmoid(a + b * x).

    Minimises  sum_i[ -y_i log s_i - (1 - y_i) log(1 - s_i) ] + l2 / 2 * b^2,  s_i = sigmoid(a + b x_i),
    with ties as y = 0.5 targets, by Newton's method (IRLS) with step halving. The L2 on the slope
    keeps it finite when length separates wins from losses perfectly; summed over prompts, its
    pull fades as N grows, so it does not bias the intercept of a well-sampled fit. Outcomes that
    are all equal have no finite intercept (all wins: a -> inf); the caller handles that case.
    """
    y = np.asarray(outcomes, dtype=float)
    X = np.stack([np.ones_like(y), np.asarray(feature, dtype=float)], axis=1)  # [N, 2]
    penalty = np.diag([0.0, l2])

    def loss(w: np.ndarray) -> float:
        z = X @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w[1] ** 2)

    w = np.zeros(2)
    for _ in range(steps):
        s = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (s - y) + penalty @ w
        hessian = (X * (s * (1 - s))[:, None]).T @ X + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, grad)
        scale, before = 1.0, loss(w)
        while loss(w - scale * step) > before:
            scale /= 2
            if scale < 1e-8:  # no step lowers the loss: this is the minimum, to rounding
                return float(w[0]), float(w[1])
        w = w - scale * step
        if np.abs(scale * step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(
    outcomes: Sequence[float], policy_lengths: Sequence[float], baseline_lengths: Sequence[float]
) -> float:
    """sigmoid(intercept) of ``fit_length_model`` on tanh(d / std(d)): the win-rate the fitted
    model predicts when both answers have the same length (d = 0). Constant outcomes (all wins,
    all ties, ...) are their own length-controlled win-rate: nothing is left for length to explain."""
    y = np.asarray(outcomes, dtype=float)
    if y.min() == y.max():
        return float(y[0])
    intercept, _ = fit_length_model(y, length_feature(policy_lengths, baseline_lengths))
    return float(1 / (1 + np.exp(-intercept)))


def summarize(
    outcomes: Sequence[float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Everything the report shows for one judge x baseline."""
    wins, ties, losses = counts(outcomes)
    low, high = bootstrap_interval(outcomes, resamples, seed)
    return {
        "n": len(outcomes),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": win_rate(outcomes),
        "ci_low": low,
        "ci_high": high,
        "lc_win_rate": length_controlled_win_rate(outcomes, policy_lengths, baseline_lengths),
        "policy_length": float(np.mean(policy_lengths)),
        "baseline_length": float(np.mean(baseline_lengths)),
    }
