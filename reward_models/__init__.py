"""Pluggable rewards for PPO, GRPO and evaluation: one interface, one registry.

A reward is a callable ``(prompts, completions, **columns) -> list[float]`` with a ``name``:
prompts are chat message lists (what the policy saw), completions are answer texts, and columns
are extra dataset fields a rule may need (``reference=[...]`` for exact-answer rules).

    build_reward({"type": "rule", "name": "gsm8k_exact"})
    build_reward({"type": "learned", "path": "runs/recipe/reward"})
    build_reward({"type": "learned", "from": "reward"}, stage_dirs={"reward": Path("runs/recipe/reward")})
    build_reward({"type": "judge", "model": "smollm2-135m-instruct", "mode": "pointwise"})
    build_reward([{"type": "rule", "name": "gsm8k_exact", "weight": 1.0},
                  {"type": "rule", "name": "length_penalty", "weight": 0.1}])
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Protocol

from reward_models import rules


class Reward(Protocol):
    name: str

    def __call__(self, prompts: list[list[dict]], completions: list[str], **columns: list[Any]) -> list[float]: ...


# The keys each reward type takes (besides ``type``), so a recipe is checked before anything runs.
SPEC_KEYS = {
    "rule": {"name", "weight"},  # plus the rule's own options, read from its signature
    "learned": {"from", "path", "batch_size", "weight"},
    "judge": {"model", "mode", "batch_size", "weight"},
}


def _close(word: str, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" - did you mean {match[0]!r}?" if match else ""


def check_spec(spec: Any) -> None:
    """Raise ValueError naming what is wrong with a reward spec (or a weighted list of them): the
    type, a rule's name and options (with a suggestion), missing or unknown keys, a weight that is
    not a number. Loads nothing; folders and models are checked where they are read."""
    parts = spec if isinstance(spec, list) else [spec]
    if not parts:
        raise ValueError("reward is an empty list; give at least one {type: rule|learned|judge, ...}")
    for index, part in enumerate(parts):
        where = f"reward[{index}]" if isinstance(spec, list) else "reward"
        if not isinstance(part, dict):
            raise ValueError(f"{where} must be a mapping {{type: rule|learned|judge, ...}}, got {part!r}")
        kind = part.get("type")
        if kind not in SPEC_KEYS:
            raise ValueError(f"{where}: type must be rule, learned or judge, not {kind!r}{_close(kind, SPEC_KEYS)}")
        if "weight" in part and (isinstance(part["weight"], bool) or not isinstance(part["weight"], (int, float))):
            raise ValueError(f"{where}: weight must be a number, got {part['weight']!r}")
        keys = set(part) - {"type"}
        if kind == "rule":
            name = part.get("name")
            if name not in rules.RULES:
                raise ValueError(
                    f"{where}: unknown rule {name!r}{_close(name, rules.RULES)} (rules: "
                    f"{', '.join(sorted(rules.RULES))})"
                )
            options = [
                p
                for p, v in inspect.signature(rules.RULES[name]).parameters.items()
                if v.default is not inspect.Parameter.empty
            ]
            allowed = SPEC_KEYS["rule"] | set(options)
        else:
            allowed = SPEC_KEYS[kind]
            needed = ("from", "path") if kind == "learned" else ("model",)
            if not any(k in part for k in needed):
                raise ValueError(f"{where}: a {kind} reward needs {' or '.join(needed)}")
            if kind == "learned" and "from" in part and "path" in part:
                raise ValueError(f"{where}: give from (a stage) or path (a folder), not both")
            if kind == "judge" and part.get("mode", "pairwise") not in ("pairwise", "pointwise"):
                raise ValueError(f"{where}: judge mode must be pairwise or pointwise, not {part['mode']!r}")
        for key in sorted(keys - allowed):
            raise ValueError(
                f"{where}: a {kind} reward{' ' + repr(part.get('name')) if kind == 'rule' else ''} has no key {key!r}"
                f"{_close(key, allowed)} (keys: {', '.join(sorted(allowed))})"
            )


class RuleReward:
    """A plain typed function from reward_models.rules, given only the columns it asks for."""

    def __init__(self, name: str, **options):
        if name not in rules.RULES:
            raise KeyError(f"unknown rule reward '{name}' (known: {', '.join(sorted(rules.RULES))})")
        self.name, self.function, self.options = name, rules.RULES[name], options
        self.parameters = inspect.signature(self.function).parameters
        settable = [p for p, v in self.parameters.items() if v.default is not inspect.Parameter.empty]
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
    """Several rewards, each scaled by its weight, added per sample."""

    def __init__(self, parts: list[tuple[float, Reward]]):
        self.parts = parts
        self.name = " + ".join(f"{w:g}*{r.name}" for w, r in parts)

    def __call__(self, prompts, completions, **columns):
        totals = [0.0] * len(completions)
        for weight, reward in self.parts:
            for i, value in enumerate(reward(prompts, completions, **columns)):
                totals[i] += weight * value
        return totals


def build_reward(
    spec: dict | list[dict], stage_dirs: dict[str, Path] | None = None, trust_remote_code: bool = False
) -> Reward:
    """A reward from a recipe's ``reward:`` section (a spec, or a list of weighted specs).

    ``{type: learned, from: reward}`` names a stage; ``stage_dirs`` maps stage names to their
    finished folders (the pipeline passes runs/<recipe>/<stage>). ``trust_remote_code`` comes from
    the recipe being run (its model section), never from the folders the rewards are read from.
    """
    if isinstance(spec, list):
        return WeightedSum(
            [
                (
                    float(part.get("weight", 1.0)),
                    build_reward({k: v for k, v in part.items() if k != "weight"}, stage_dirs, trust_remote_code),
                )
                for part in spec
            ]
        )
    kind = spec.get("type")
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
    raise KeyError(f"unknown reward type {kind!r} (rule, learned, judge)")
