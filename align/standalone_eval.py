"""`align eval` without a recipe: an eval stage's config built from the command line (--policy,
--baseline, --prompts, --judge ...). Its errors are RecipeErrors naming the option, raised before any
model or data file is read; the command line turns them into one message and exit status 2."""

from __future__ import annotations

import os
import re
from pathlib import Path

from align.config import RecipeError


def option_value(text: str) -> int | float | str:
    """A number when it reads as one, else the text (not YAML: 'yes' must stay a string)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def judge_spec(text: str):
    """rule:NAME[,key=value...] | learned:DIR | judge:MODEL (pairwise) | judge-pointwise:MODEL | remote:URL |
    openai:MODEL | openai-pointwise:MODEL (key in OPENAI_API_KEY, base URL from OPENAI_BASE_URL if set) |
    python:FILE.py:FUNCTION -> a typed
    reward spec (align.config), checked now: a misspelt rule is a bad --judge, not a failure later."""
    from align.config import parse_reward

    kind, _, rest = text.partition(":")
    if kind == "rule" and rest:
        name, *options = rest.split(",")
        pairs = [option.partition("=") for option in options]
        if any(not sep for _, sep, _ in pairs):
            raise RecipeError(f"--judge {text}: rule options are key=value, e.g. rule:contains_marker,marker=yes")
        spec = {"type": "rule", "name": name, **{key: option_value(value) for key, _, value in pairs}}
    elif kind == "learned" and rest:
        spec = {"type": "learned", "path": rest}
    elif kind in ("judge", "judge-pointwise") and rest:
        spec = {"type": "judge", "model": rest, "mode": "pointwise" if kind == "judge-pointwise" else "pairwise"}
    elif kind == "remote" and rest:
        spec = {"type": "remote", "url": rest}
    elif kind == "python" and rest:
        spec = {"type": "python", "function": rest}
    elif kind in ("openai", "openai-pointwise") and rest:
        mode = "pointwise" if kind == "openai-pointwise" else "pairwise"
        spec = {"type": "openai", "model": rest, "mode": mode}
        if os.environ.get("OPENAI_BASE_URL"):
            spec["base_url"] = os.environ["OPENAI_BASE_URL"]
    else:
        raise RecipeError(
            f"--judge {text}: use rule:NAME, learned:DIR, judge:MODEL, judge-pointwise:MODEL, remote:URL, "
            "openai:MODEL, openai-pointwise:MODEL or python:FILE.py:FUNCTION"
        )
    try:
        return parse_reward(spec, f"--judge {text}")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def standalone_eval_config(
    policy: Path,
    baselines: list[str],
    prompts: list[str],
    judges: list[str],
    max_prompts: int | None,
    max_new_tokens: int | None,
    temperature: float | None,
    engine: str,
):
    """An eval config without a recipe: the model sections are the policy stage's own (so 'base' is
    what it was trained from), or the folder itself for a plain model folder."""
    from align.config import EvalConfig
    from align.models.trained import stage_config
    from align.recipe import validate
    from align.stages.contestants import check_folder

    if not prompts or not judges:
        raise RecipeError("align eval without --recipe needs --prompts FILE and at least one --judge")
    judge_specs = {text: judge_spec(text) for text in judges}  # a bad --judge first: nothing read yet
    if check_folder(policy):
        trained = stage_config(policy)
        model, quantization = trained.model.model_dump(), trained.quantization.model_dump()
    else:
        model, quantization = {"name": str(policy)}, {"mode": "none"}
    rollout = {
        "engine": engine,
        **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
        **({"temperature": temperature} if temperature is not None else {}),
    }
    return validate(
        EvalConfig,
        {
            "model": model,
            "quantization": quantization,
            # folders as absolute paths: a bare name would be read as a stage of a recipe
            "policy": str(policy.resolve()),
            "baselines": [b if b == "base" else str(Path(b).resolve()) for b in baselines or ["base"]],
            "judges": judge_specs,
            "data": {"eval": prompt_sets(prompts), "max_eval_rows": max_prompts},
            "rollout": rollout,
        },
        where="align eval",
    )


def prompt_sets(prompts: list[str]) -> list[str] | dict[str, list[str]]:
    """--prompts FILE (one set) or NAME=FILE (named sets, one table each); a file given without a
    name among named ones is named by its file name."""
    if not any("=" in p for p in prompts):
        return list(prompts)
    sets: dict[str, list[str]] = {}
    for text in prompts:
        name, _, path = text.rpartition("=")
        sets.setdefault(name or Path(path).stem, []).append(path)
    return sets


def output_name(policy: Path) -> str:
    """A policy folder's name as a plain run name (runs/eval/<name>)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", policy.resolve().name).strip(".-") or "policy"
