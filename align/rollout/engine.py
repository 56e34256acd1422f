"""What every rollout engine shares: sampling settings, the rollout record, stop handling.

An engine turns conversations into sampled completions:

    engine.generate(conversations, Sampling(n=4, temperature=1.0)) -> list[Rollout]
    engine.sync_weights(policy)   # after an optimizer step; verified, never silently stale

Prompts are encoded by ``encode_prompt``, the function the trainers use, so a rollout's prompt
ids are exactly the ids the trainer scores (RELIABILITY 3). Both engines return completions cut
the same way (``finish``): at the first end-of-turn id, else at the first stop string, else at
``max_new_tokens``; the cut token is kept, because the policy must learn to emit it.

``Rollout.logprobs`` are the log-probabilities of each sampled token under the distribution it
was drawn from (temperature, top-k and top-p applied; plain log-softmax for greedy). They are
for measuring the sampler/trainer mismatch only: the RL losses always recompute logprobs with
the trainer (``align.rollout.scoring``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from align.data.templating import encode_prompt, end_of_turn_ids


@dataclass(frozen=True)
class Sampling:
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={self.n}, max_new_tokens={self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, {self.top_p}, {self.top_k}"
            )
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class Rollout:
    """One sampled completion. ``prompt_index`` says which input conversation it answers."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # one per completion id, under the sampling distribution
    finish_reason: str  # "stop" (end-of-turn id or stop string) or "length"
    text: str  # decoded completion without the end-of-turn token or stop string
    engine_version: int = field(default=0)  # policy version the engine sampled from

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class SyncError(RuntimeError):
    """The engine's logprobs after a weight sync do not match the trainer's; it was not advanced."""


class EngineSettingsError(ValueError):
    """The engine could serve this policy but not with the settings it was given (align's sizing or the
    user's): an error under engine auto too. Falling back to another engine would hide it - a KV cache
    sized one block short once sent the quickstart's GRPO to the hf engine with one yellow line."""


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Every id that ends a turn: the tokenizer's end-of-turn tokens and the generation config's eos ids."""
    ids = set(end_of_turn_ids(tokenizer))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return ids


def finish(
    tokenizer, completion_ids: list[int], logprobs: list[float], eos_ids: set[int], stop: tuple[str, ...]
) -> tuple[list[int], list[float], str, str]:
    """Cut a raw completion the way both engines must: (ids, logprobs, finish_reason, text).

    The first end-of-turn id ends it (kept). Otherwise the shortest prefix whose text contains a
    stop string ends it (kept; the text stops before the string). Otherwise it ran out of length.
    """
    for i, token in enumerate(completion_ids):
        if token in eos_ids:
            ids = completion_ids[: i + 1]
            return ids, logprobs[: i + 1], "stop", tokenizer.decode(ids[:-1], skip_special_tokens=True)
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s in text]
    if not hits:
        return completion_ids, logprobs, "length", text
    for end in range(1, len(completion_ids) + 1):  # shortest token prefix that holds the stop string
        prefix = tokenizer.decode(completion_ids[:end], skip_special_tokens=True)
        cut = [prefix.find(s) for s in stop if s in prefix]
        if cut:
            return completion_ids[:end], logprobs[:end], "stop", prefix[: min(cut)]
    raise AssertionError("unreachable: the whole completion contains a stop string")


def encode_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    return [encode_prompt(tokenizer, messages) for messages in conversations]


class Engine(Protocol):
    """What the RL loops, eval and the CLI may use of an engine; hf.py and vllm.py implement it."""

    name: str
    version: int  # the policy version it samples from; rollouts carry it
    # True only when the engine's sampling distribution is the trainer's own computation, so
    # sampler/trainer importance correction would multiply by exactly 1 (RELIABILITY 3)
    samples_from_trainer: bool

    def describe(self) -> str: ...

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[Rollout]: ...

    def generate_ids(self, prompts: list[list[int]], sampling: Sampling) -> list[Rollout]: ...

    def stream(self, conversation: list[dict], sampling: Sampling) -> Iterator[str]: ...

    def sync_weights(self, policy) -> None:
        """Serve the policy's current weights; verified, so a stale engine never samples."""

    def close(self) -> None: ...
