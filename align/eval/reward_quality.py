"""How far a reward model's pairwise verdicts can be trusted, from its margins on held-out pairs, as
pure functions (doctested). A margin is score(chosen) - score(rejected) for one pair; a Bradley-Terry
reward model reads sigmoid(margin) as the probability that the chosen answer is preferred.

  accuracy     - the share of pairs with a positive margin, with a bootstrap 95% interval over pairs:
                 20 held-out pairs at 0.625 is a weak claim, and the interval says how weak
  calibration  - expected calibration error: pairs binned by the model's confidence in its own verdict,
                 max(p, 1 - p) with p = sigmoid(margin); the mean |accuracy - confidence| over bins,
                 weighted by their pairs (0: it is as sure as it is right)
  by margin    - accuracy of the pairs in each quarter of |margin|: a model worth optimising against is
                 right more often where it is surer
"""

from __future__ import annotations

import math
from typing import Sequence

from align.eval.winrate import bootstrap_interval

CALIBRATION_BINS = 10  # equal-width confidence bins over [0.5, 1]


def calibration_error(margins: Sequence[float], bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of sigmoid(margin) as the chance that the chosen answer wins.

    >>> calibration_error([5.0, 5.0, 5.0, 5.0])  # sure of each, right on each
    0.0067
    >>> calibration_error([5.0, -5.0])  # as sure, right on one pair only: about 0.49 off
    0.4933
    """
    if not margins:
        return 0.0
    filled: dict[int, list[tuple[float, float]]] = {}
    for margin in margins:
        p = 1.0 / (1.0 + math.exp(-margin))
        confidence = max(p, 1.0 - p)
        index = min(int((confidence - 0.5) * 2 * bins), bins - 1)
        filled.setdefault(index, []).append((confidence, float(margin > 0)))
    error = sum(
        abs(sum(c for c, _ in pairs) / len(pairs) - sum(r for _, r in pairs) / len(pairs)) * len(pairs)
        for pairs in filled.values()
    )
    return round(error / len(margins), 4)


def accuracy_by_margin(margins: Sequence[float]) -> list[dict[str, float]]:
    """Accuracy in each quarter of the pairs, ordered by |margin| (up to 4 groups of near-equal size).

    >>> [g["accuracy"] for g in accuracy_by_margin([0.1, -0.2, 0.3, -0.4, 1.0, 2.0, 3.0, 4.0])]
    [0.5, 0.5, 1.0, 1.0]
    """
    ordered = sorted(margins, key=abs)
    groups, n = [], len(ordered)
    for q in range(min(4, n)):
        part = ordered[q * n // min(4, n) : (q + 1) * n // min(4, n)]
        groups.append(
            {
                "abs_margin_low": round(abs(part[0]), 4),
                "abs_margin_high": round(abs(part[-1]), 4),
                "pairs": len(part),
                "accuracy": sum(m > 0 for m in part) / len(part),
            }
        )
    return groups


def pair_diagnostics(margins: Sequence[float]) -> dict:
    """Accuracy with its bootstrap 95% interval, the calibration error, and accuracy by margin quarter.

    >>> d = pair_diagnostics([1.0, 2.0, -0.5, 3.0])
    >>> d["accuracy"], d["pairs"], d["accuracy_low"] <= 0.75 <= d["accuracy_high"]
    (0.75, 4, True)
    """
    if not margins:
        return {}
    right = [float(m > 0) for m in margins]
    low, high = bootstrap_interval(right)
    return {
        "pairs": len(margins),
        "accuracy": sum(right) / len(right),
        "accuracy_low": low,
        "accuracy_high": high,
        "calibration_error": calibration_error(margins),
        "accuracy_by_margin": accuracy_by_margin(margins),
    }
