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
    before: dict,
    after: dict,
    kl: float | None,
    *,
    max_kl: float,
    max_loop_rise: float,
    max_cutoff_rise: float,
    max_reward_drop: float,
) -> list[str]:
    """What crossed a threshold between the start and the end of a stage ([] = nothing).

    >>> limits = dict(max_kl=1.0, max_loop_rise=0.25, max_cutoff_rise=0.25, max_reward_drop=0.15)
    >>> start = {"loop_fraction": 0.0, "truncated_fraction": 0.0, "reward": 0.8}
    >>> end = {"loop_fraction": 0.5, "truncated_fraction": 1.0, "reward": 0.2}
    >>> for reason in collapse_reasons(start, end, 0.1, **limits):
    ...     print(reason)
    answers stuck in a repeated loop rose from 0.00 to 0.50 (threshold +0.25)
    answers cut off at the token limit rose from 0.00 to 1.00 (threshold +0.25)
    held-out reward fell from 0.800 to 0.200 (threshold -0.15)
    >>> collapse_reasons(start, start, 2.5, **limits)
    ['KL to the start 2.500 per token (threshold 1.0)']
    """
    reasons = []
    if kl is not None and kl > max_kl:
        reasons.append(f"KL to the start {kl:.3f} per token (threshold {max_kl})")
    for key, what, limit in (
        ("loop_fraction", "answers stuck in a repeated loop", max_loop_rise),
        ("truncated_fraction", "answers cut off at the token limit", max_cutoff_rise),
    ):
        if after[key] - before[key] > limit:
            reasons.append(f"{what} rose from {before[key]:.2f} to {after[key]:.2f} (threshold +{limit})")
    if (
        before.get("reward") is not None
        and after.get("reward") is not None
        and before["reward"] - after["reward"] > max_reward_drop
    ):
        reasons.append(
            f"held-out reward fell from {before['reward']:.3f} to {after['reward']:.3f} (threshold -{max_reward_drop})"
        )
    return reasons


# How much further than the chosen answers the rejected ones must fall for a pair to count as separating:
# per token, over the same logs. Measured (2026-12-07): a healthy DPO run on the summary pairs 1.7-2.0x
# once its chosen answers fell (1.16x in its first steps, when they had barely moved); a tiny model
# pushed to displacement 1.36x; contradictory pairs, where nothing can separate, 0.99-1.01x.
SEPARATION = 1.1


def preference_drift(chosen: float, rejected: float | None, accuracy: float | None, max_drop: float) -> str | None:
    """How a preference stage's answers moved from its start, from their per-token log-ratios to the
    reference (policy minus reference logprob, averaged over the answers' tokens): None while the
    chosen answers stay within ``max_drop`` of the start; past it, "displacement" when the pairs
    separate - the rejected answers fell SEPARATION times as far or further and, where the held-out
    pairs' ``accuracy`` is known, more than half of them rank the chosen answer higher - and "collapse"
    when they do not: both sides pushed down together.

    Falling chosen answers alone are DPO's usual likelihood displacement (both sides fall, the rejected
    faster) and not a collapse: a healthy run on the summary pairs logged -0.501 with held-out accuracy
    0.81. Whether a displaced policy still answers well is the checkup's question, on its own answers.

    >>> preference_drift(-0.2, -0.4, 0.75, 0.5) is None
    True
    >>> preference_drift(-0.9, -1.5, None, 0.5)
    'displacement'
    >>> preference_drift(-20.0, -20.1, None, 0.5)  # both fell, the rejected barely further
    'collapse'
    >>> preference_drift(-3.0, -4.5, 0.5, 0.5)  # the rejected fell further, but no more pairs rank right than chance
    'collapse'
    >>> preference_drift(-0.9, None, None, 0.5)  # KTO with only desirable answers logged: nothing says they separate
    'collapse'
    """
    if chosen >= -max_drop:
        return None
    separating = rejected is not None and rejected <= SEPARATION * chosen and (accuracy is None or accuracy > 0.5)
    return "displacement" if separating else "collapse"
