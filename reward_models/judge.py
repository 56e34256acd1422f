"""An LLM as judge: a local causal LM (loaded by align's own loading code) reads the question and
answers and we read its next-token probabilities - no sampling, no parsing of free text.

- pairwise: "which answer is better, A or B?" asked in both orders; the probability that the first
  answer wins is the mean of P(A | first shown as A) and P(B | first shown as B), which cancels a
  judge's preference for a position. How often the two orders disagree is the position-bias rate.
- pointwise: "is this answer correct and helpful? Yes or No" -> P(Yes) / (P(Yes) + P(No)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.data.batching import PaddingCollator
from align.data.templating import encode_prompt
from align.tokens import IGNORE_INDEX

PAIRWISE = (
    "You are judging two answers to the same question.\n\nQuestion:\n{question}\n\n"
    "Answer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better: more correct, more helpful, and no longer than needed? Reply with one letter, A or B."
)
POINTWISE = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\nIs this answer correct and helpful? Reply with one word, Yes or No."
)


def _question(prompt: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in prompt if m["role"] != "system")


class Verdicts:
    """A judge that answers a question with one of two options (A/B, Yes/No), as a probability: the
    pairwise comparison in both orders and the pointwise score, on top of ``_choice_probs``. The
    local LM (``LLMJudge``) and an API (reward_models/remote.py, ``OpenAIJudge``) provide it."""

    mode: str
    last_position_bias: float | None = None

    def _choice_probs(self, questions: list[str]) -> list[float]:
        """P(first option) / (P(first) + P(second)) for each question."""
        raise NotImplementedError

    def compare(self, prompts: list[list[dict]], answers: list[str], others: list[str]) -> list[float]:
        """Probability that each answer beats the other one, averaged over both presentation orders."""
        questions = [_question(p) for p in prompts]
        as_a = self._choice_probs(
            [PAIRWISE.format(question=q, a=x, b=y) for q, x, y in zip(questions, answers, others)]
        )
        as_b = self._choice_probs(
            [PAIRWISE.format(question=q, a=y, b=x) for q, x, y in zip(questions, answers, others)]
        )
        wins = [(p1 + (1 - p2)) / 2 for p1, p2 in zip(as_a, as_b)]
        # the orders disagree when the same slot wins both times: the verdict followed the position
        flips = [(p1 > 0.5) == (p2 > 0.5) for p1, p2 in zip(as_a, as_b)]
        self.last_position_bias = sum(flips) / len(flips) if flips else None
        return wins

    def __call__(self, prompts, completions, baseline: list[str] | None = None, **columns) -> list[float]:
        if self.mode == "pointwise":
            return self._choice_probs(
                [POINTWISE.format(question=_question(p), answer=c) for p, c in zip(prompts, completions)]
            )
        if baseline is None:
            raise KeyError("a pairwise judge needs a 'baseline' column: the answer each completion is compared with")
        return self.compare(prompts, completions, baseline)


class LLMJudge(Verdicts):
    """A reward (pointwise, or pairwise against a ``baseline`` column) from a local LM's verdicts."""

    def __init__(self, model: str | Path, mode: str = "pairwise", batch_size: int = 4, trust_remote_code: bool = False):
        from align.models.resolve import resolve_model
        from align.models.trained import load_trained

        if mode not in ("pairwise", "pointwise"):
            raise ValueError(f"judge mode must be pairwise or pointwise, not {mode!r}")
        folder = Path(model) if Path(model).is_dir() else resolve_model(str(model))
        self.model, self.tokenizer = load_trained(folder, trust_remote_code=trust_remote_code)
        self.model.eval()
        if torch.cuda.is_available() and not getattr(self.model, "is_loaded_in_4bit", False):
            self.model.to("cuda")  # 4-bit models are placed on the GPU when they load
        self.mode, self.batch_size, self.name = mode, batch_size, f"judge:{model}:{mode}"
        self.collate = PaddingCollator(self.tokenizer.pad_token_id)
        first = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"][0]
        self.options = {"pairwise": (first("A"), first("B")), "pointwise": (first("Yes"), first("No"))}[mode]
        self.last_position_bias: float | None = None

    @torch.no_grad()
    def _choice_probs(self, questions: list[str]) -> list[float]:
        """P(first option) / (P(first) + P(second)) for the judge's next token after each question."""
        rows = [encode_prompt(self.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        probs: list[float] = []
        device = next(self.model.parameters()).device
        first, second = self.options
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = self.collate([{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)} for ids in chunk])
            mask = batch["attention_mask"].to(device)
            logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits.float()
            last = logits[torch.arange(len(chunk), device=device), mask.sum(-1) - 1]
            pair = torch.log_softmax(last, -1)[:, [first, second]]
            probs += torch.softmax(pair, -1)[:, 0].tolist()
        return probs
