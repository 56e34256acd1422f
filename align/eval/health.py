"""Signs that a policy is degenerating, as pure functions of its answers (doctested).

A stage that makes the model worse must say so: these are the numbers a before/after checkup
(align/stages/checkup.py) and the RL loops report, and the collapse alarm reads.
"""

from __future__ import annotations

from collections import Counter

LOOP_NGRAM = 4  # tokens per n-gram
LOOP_REPEATS = 4  # an n-gram this many times in one answer is a loop ("= ten feet * ten = ten feet * ...")


def has_loop(tokens: list[int], n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """True when some n-gram of ``tokens`` occurs ``repeats`` times or more.

    >>> has_loop([1, 2, 3, 4] * 4)
    True
    >>> has_loop([1, 2, 3, 4] * 3 + [5])
    False
    >>> has_loop([7] * 3)
    False
    """
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def distinct_n(answers: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of all answers (1.0: no n-gram repeats anywhere; answers
    that all say the same thing, or loop, push it towards 0).

    >>> distinct_n([[1, 2, 3], [1, 2, 4]])
    0.75
    >>> distinct_n([[1]])
    0.0
    """
    grams = [tuple(a[i : i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degeneration(answers: list[list[int]], truncated: list[bool]) -> dict[str, float]:
    """The answer-shape numbers of a checkup: share of answers in a loop, distinct-2, mean length in
    tokens, share cut at max_new_tokens.

    >>> degeneration([[1, 2, 3, 4] * 4, [5, 6]], [True, False])
    {'loop_fraction': 0.5, 'distinct_2': 0.3125, 'length_mean': 9.0, 'truncated_fraction': 0.5}
    """
    count = max(len(answers), 1)
    return {
        "loop_fraction": sum(has_loop(a) for a in answers) / count,
        "distinct_2": distinct_n(answers, 2),
        "length_mean": sum(len(a) for a in answers) / count,
        "truncated_fraction": sum(truncated) / count,
    }


def collapse_reasons(
    before: dict, after: dict, kl: float | None, max_kl: float, max_loop_rise: float, max_reward_drop: float
) -> list[str]:
    """What crossed a threshold between the start and the end of a stage ([] = nothing).

    >>> for reason in collapse_reasons({"loop_fraction": 0.0, "reward": 0.8},
    ...                                {"loop_fraction": 0.5, "reward": 0.2}, 0.1, 1.0, 0.25, 0.15):
    ...     print(reason)
    answers stuck in a repeated loop rose from 0.00 to 0.50 (threshold +0.25)
    held-out reward fell from 0.800 to 0.200 (threshold -0.15)
    >>> collapse_reasons({"loop_fraction": 0.0}, {"loop_fraction": 0.0}, 2.5, 1.0, 0.25, 0.15)
    ['KL to the start 2.500 per token (threshold 1.0)']
    """
    reasons = []
    if kl is not None and kl > max_kl:
        reasons.append(f"KL to the start {kl:.3f} per token (threshold {max_kl})")
    if after["loop_fraction"] - before["loop_fraction"] > max_loop_rise:
        reasons.append(
            f"answers stuck in a repeated loop rose from {before['loop_fraction']:.2f} to {after['loop_fraction']:.2f} "
            f"(threshold +{max_loop_rise})"
        )
    if (
        before.get("reward") is not None
        and after.get("reward") is not None
        and before["reward"] - after["reward"] > max_reward_drop
    ):
        reasons.append(
            f"held-out reward fell from {before['reward']:.3f} to {after['reward']:.3f} (threshold -{max_reward_drop})"
        )
    return reasons
