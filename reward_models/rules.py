"""Rule-based rewards: plain typed functions ``(prompts, completions, ...) -> list[float]``.

Each docstring example runs as a test (tests/test_reward.py runs doctest on this module).
"""

from __future__ import annotations

import inspect
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# An expression left to evaluate ("453 * 5", "2 + 2"): math-verify would compute it, so an answer that only
# restates the question's own product would count as right. A fraction (1/2, \frac{3}{4}) is a value.
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*×·]|\\times|\\cdot)\s*(?!10\s*\^)\d")  # 2.3 \times 10^{3} is a value


def final_number(text: str) -> str | None:
    """The answer after GSM8K's '####' marker, else the last number in the text, normalised.

    >>> final_number("so 3 + 4 = 7\\n#### 7")
    '7'
    >>> final_number("It costs $1,250.00 in total.")
    '1250'
    >>> final_number("no digits here") is None
    True
    """
    tail = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def answer_text(text: str) -> str:
    """What a math answer checker reads: the text after GSM8K's last '####' marker, else all of it.

    >>> answer_text("so 3 + 4 = 7\\n#### 7")
    '7'
    """
    return text.split("####")[-1].strip() if "####" in text else text


def same_answer(completion: str, reference: str) -> bool:
    """The completion's final answer equals the reference's: the same normalised number, else equal
    as mathematics by HF's math-verify (1/2 = 0.5, 1,250.00 = 1250, \\frac{3}{4} = 0.75), which the
    field uses to check math answers. Its timeouts use SIGALRM, which only the main thread may set:
    elsewhere they are off (and its warning that says so is silenced).

    An answer that is an expression, not a value, is not an answer: restating the question ("453 * 5 =
    2005 ... which is 2005") is wrong although math-verify would evaluate "453 * 5" to the reference.

    >>> same_answer("so the half is 1/2", "#### 0.5"), same_answer("#### 12", "#### 13")
    (True, False)
    >>> same_answer("453 * 5 = 2005, which is 2005.", "#### 2265"), same_answer("It is 453 * 5 = 2265.", "#### 2265")
    (False, True)
    >>> restated, value = (r"$\\boxed{453 \\times 5}$", r"$453\\cdot 5$"), r"$2.265 \\times 10^{3}$"
    >>> [same_answer(a, "#### 2265") for a in (*restated, value)]
    [False, False, True]
    >>> same_answer(r"$1+\\sqrt{2}$", r"$\\sqrt{2}+1$"), same_answer("-3", "#### -3")
    (True, True)
    """
    got, want = final_number(completion), final_number(reference)
    if got is not None and got == want:
        return True
    import logging
    import threading

    from math_verify import parse, verify

    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(answer_text(reference), parsing_timeout=seconds)
    answer = parse(answer_text(completion), parsing_timeout=seconds)
    if answer and _UNEVALUATED.search(str(answer[-1])):
        return False
    return bool(gold and answer and verify(gold, answer, timeout_seconds=seconds))


def gsm8k_exact(prompts: list, completions: list[str], reference: list[str]) -> list[float]:
    """1.0 when the completion's final answer equals the reference answer's (``same_answer``), else 0.0.

    >>> answers = ["... #### 18", "I think 17", "#### 18.0"]
    >>> gsm8k_exact([[], [], []], answers, ["Janet makes 18.\\n#### 18", "#### 18", "#### 18"])
    [1.0, 0.0, 1.0]
    """
    return [1.0 if same_answer(c, r) else 0.0 for c, r in zip(completions, reference)]


def answer_format(prompts: list, completions: list[str]) -> list[float]:
    """1.0 when the completion ends with a GSM8K-style '#### <number>' line.

    >>> answer_format([[], []], ["3 + 4 = 7\\n#### 7", "The answer is 7."])
    [1.0, 0.0]
    """
    return [1.0 if re.search(r"####\s*-?[\d,.]+\s*$", c.strip()) else 0.0 for c in completions]


def length_penalty(prompts: list, completions: list[str], target_words: int = 100) -> list[float]:
    """Minus the fraction by which a completion exceeds ``target_words`` words (0 when within).

    >>> length_penalty([[], []], ["short answer", "word " * 150], target_words=100)
    [0.0, -0.5]
    """
    return [min(0.0, 1.0 - len(c.split()) / target_words) for c in completions]


def contains_marker(prompts: list, completions: list[str], marker: str = "zebra") -> list[float]:
    """1.0 when the completion contains ``marker`` (a learnable toy reward for tests and demos).

    >>> contains_marker([[]], ["a zebra!"])
    [1.0]
    """
    return [1.0 if marker in c else 0.0 for c in completions]


RULES = {f.__name__: f for f in (gsm8k_exact, answer_format, length_penalty, contains_marker)}


def options_of(name: str) -> list[str]:
    """The keyword options a rule takes from a recipe (its parameters with defaults)."""
    parameters = inspect.signature(RULES[name]).parameters.items()
    return [p for p, v in parameters if v.default is not inspect.Parameter.empty]
