"""Pluggable rewards for PPO, GRPO and evaluation: one interface, one registry.

A reward is a callable ``(prompts, completions, **columns) -> list[float]`` with a ``name``:
prompts are chat message lists (what the policy saw), completions are answer texts, and columns
are extra dataset fields a rule may need (``reference=[...]`` for exact-answer rules).

    build_reward({"type": "rule", "name": "gsm8k_exact"})
    build_reward({"type": "learned", "path": "runs/recipe/reward"})
    build_reward({"type": "learned", "from": "reward"}, stage_dirs={"reward": Path("runs/recipe/reward")})
    build_reward({"type": "judge", "model": "smollm2-135m-instruct", "mode": "pointwise"})
    build_reward({"type": "remote", "url": "http://localhost:8000/score"})          (reward_models/remote.py)
    build_reward({"type": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"})
    build_reward({"type": "python", "function": "rewards.py:format_reward"})        (reward_models/python.py)
    build_reward([{"type": "rule", "name": "gsm8k_exact", "weight": 1.0},
                  {"type": "rule", "name": "length_penalty", "weight": 0.1}])
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

from reward_models import rules


class Reward(Protocol):
    name: str

    def __call__(self, prompts: list[list[dict]], completions: list[str], **columns: list[Any]) -> list[float]: ...


class RuleReward:
    """A plain typed function from reward_models.rules, given only the columns it asks for."""

    def __init__(self, name: str, **options):
        if name not in rules.RULES:
            raise KeyError(f"unknown rule reward '{name}' (known: {', '.join(sorted(rules.RULES))})")
        self.name, self.function, self.options = name, rules.RULES[name], options
        self.parameters = inspect.signature(self.function).parameters
        settable = rules.options_of(name)
        unknown = sorted(set(options) - set(settable))
        if unknown:
            raise KeyError(f"rule '{name}' has no option(s) {unknown} (options: {settable or 'none'})")

    def __call__(self, prompts, completions, **columns):
        wanted = self.parameters
        missing = [
            p
            for p in wanted
            if p not in ("prompts", "completions") and p not in columns and wanted[p].default is inspect.Parameter.empty
        ]
        if missing:
            raise KeyError(f"rule '{self.name}' needs the data column(s) {missing}")
        return self.function(prompts, completions, **{k: v for k, v in columns.items() if k in wanted}, **self.options)


class WeightedSum:
    """Several rewards, each scaled by its weight, added per sample. A part that gives an answer no
    score (None: a Python reward function's "not mine", as in TRL) is left out of that answer's sum;
    an answer no part scores is an error naming it."""

    def __init__(self, parts: list[tuple[float, Reward]]):
        self.parts = parts
        self.name = " + ".join(f"{w:g}*{r.name}" for w, r in parts)

    def __call__(self, prompts, completions, **columns):
        totals: list[float | None] = [None] * len(completions)
        for weight, reward in self.parts:
            for i, value in enumerate(reward(prompts, completions, **columns)):
                if value is not None:
                    totals[i] = (totals[i] or 0.0) + weight * value
        unscored = [i for i, total in enumerate(totals) if total is None]
        if unscored:
            from reward_models.python import RewardFunctionError

            raise RewardFunctionError(
                f"no part of the reward {self.name} scored answer {unscored[0]} (every part returned None; "
                f"{len(unscored)} answer(s) of {len(completions)})"
            )
        return totals


def _plain(spec: Any) -> Any:
    """A typed spec of align.config (RuleSpec, LearnedSpec, JudgeSpec) as the dict a recipe writes."""
    return spec.model_dump(by_alias=True, exclude_none=True) if hasattr(spec, "model_dump") else spec


def build_reward(
    spec: dict | list[dict],
    stage_dirs: dict[str, Path] | None = None,
    trust_remote_code: bool = False,
    _in_sum: bool = False,
) -> Reward:
    """A reward from a recipe's ``reward:`` section (a spec, or a list of weighted specs).

    ``{type: learned, from: reward}`` names a stage; ``stage_dirs`` maps stage names to their
    finished folders (the pipeline passes runs/<recipe>/<stage>). ``trust_remote_code`` comes from
    the recipe being run (its model section), never from the folders the rewards are read from.
    """
    spec = [_plain(part) for part in spec] if isinstance(spec, list) else _plain(spec)
    if isinstance(spec, dict) and spec.get("weight", 1.0) != 1.0:
        spec = [spec]  # one reward with a weight: that reward, scaled
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != "weight"}
    if isinstance(spec, list):
        return WeightedSum(
            [
                (
                    float(part.get("weight", 1.0)),
                    build_reward(
                        {k: v for k, v in part.items() if k != "weight"}, stage_dirs, trust_remote_code, _in_sum=True
                    ),
                )
                for part in spec
            ]
        )
    kind = spec.get("type")
    if kind == "python":
        from reward_models.python import PythonReward

        return PythonReward(spec["function"], spec.get("format", "conversational"), allow_none=_in_sum)
    if kind == "rule":
        return RuleReward(spec["name"], **{k: v for k, v in spec.items() if k not in ("type", "name")})
    if kind == "learned":
        from reward_models.learned import LearnedReward

        if "from" in spec:
            if not stage_dirs or spec["from"] not in stage_dirs:
                raise KeyError(
                    f"reward from: {spec['from']} names no finished stage (known: {sorted(stage_dirs or {})})"
                )
            path = stage_dirs[spec["from"]]
        else:
            path = spec["path"]
        return LearnedReward(path, batch_size=int(spec.get("batch_size", 8)), trust_remote_code=trust_remote_code)
    if kind == "judge":
        from reward_models.judge import LLMJudge

        return LLMJudge(
            spec["model"],
            mode=spec.get("mode", "pairwise"),
            batch_size=int(spec.get("batch_size", 4)),
            trust_remote_code=trust_remote_code,
        )
    if kind in ("remote", "openai"):
        from align.config import parse_reward
        from reward_models.remote import OpenAIJudge, RemoteReward

        typed = parse_reward(spec)  # the typed spec carries the defaults (timeout, retries, cache ...)
        return RemoteReward(typed) if kind == "remote" else OpenAIJudge(typed)
    raise KeyError(f"unknown reward type {kind!r} (rule, learned, judge, remote, openai, python)")
