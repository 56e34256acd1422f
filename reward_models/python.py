"""A reward function of the user's own, in Python (``{type: python, function: "rewards.py:score"}``).

It is called as TRL's GRPOTrainer calls its ``reward_funcs``, so a function written for TRL works
unchanged: keyword arguments ``prompts`` and ``completions`` and every data column of the prompts'
rows (``reference=[...]``), one entry per answer; it returns one number per answer, or None where it
has no score for that answer. ``async def`` functions are awaited. A function that does not take
``**kwargs`` is given only the columns it names.

  conversational (default)  prompts: message lists; completions: [{"role": "assistant", "content": text}]
  standard                  prompts: the prompt's text (its last user message); completions: texts

None means "not mine to score" (TRL's convention for a function that applies to some rows only): in
a weighted list of rewards the answer's sum leaves that part out; an answer that no part scores, or a
lone function returning None, stops the stage naming the function and the answer. Anything else that
is not a finite number (a NaN, a string, the wrong count) or an exception stops it the same way: a
silent 0 would train the policy on a reward that was never computed.

The file is imported only when a stage builds the rewards its own recipe (or command line) names -
reading a recipe or a finished stage's saved config imports nothing - so code runs only because the
user asked for it, as with trust_remote_code.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable


class RewardFunctionError(RuntimeError):
    """The user's reward function could not be loaded, raised, or returned something unusable."""


def function_file(reference: str) -> Path | None:
    """The file of FILE.py:NAME (a path from the current folder); None for package.module:NAME."""
    where = reference.rpartition(":")[0]
    return Path(where).expanduser() if where.endswith(".py") or "/" in where or "\\" in where else None


def load_function(reference: str) -> Callable:
    """FILE.py:NAME (a path from the current folder) or package.module:NAME -> the function."""
    where, _, name = reference.rpartition(":")
    path = function_file(reference)
    if path is not None:
        if not path.is_file():
            raise RewardFunctionError(
                f"reward function {reference}: no file {path.resolve()} (a path is read from the folder align runs in)"
            )
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        module_name = f"align_user_rewards_{path.stem}_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[module_name]
                raise RewardFunctionError(f"reward function {reference}: importing {path} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise RewardFunctionError(f"reward function {reference}: cannot import {where}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardFunctionError(f"reward function {reference}: {where} has no function {name!r} (it has: {found})")
    return function


class PythonReward:
    """A user's reward function behind align's Reward interface (reward_models/__init__.py)."""

    def __init__(self, reference: str, format: str = "conversational", allow_none: bool = False):
        self.reference, self.format, self.allow_none = reference, format, allow_none
        self.function = load_function(reference)
        self.name = f"python {reference}"
        parameters = inspect.signature(self.function).parameters
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.parameters = parameters
        self.unscored = 0  # answers it returned None for, over the stage

    def __call__(self, prompts: list[list[dict]], completions: list[str], **columns: list[Any]) -> list[float | None]:
        if self.format == "standard":
            given = {
                "prompts": [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in prompts],
                "completions": list(completions),
            }
        else:
            given = {"prompts": prompts, "completions": [[{"role": "assistant", "content": c}] for c in completions]}
        given.update(columns)
        missing = [
            n
            for n, p in self.parameters.items()
            if n not in given
            and p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if missing:
            raise RewardFunctionError(
                f"reward function {self.reference} needs {missing}, which these rows do not have "
                f"(given: prompts, completions{''.join(', ' + c for c in columns)})"
            )
        if not self.takes_any:
            given = {k: v for k, v in given.items() if k in self.parameters}
        try:
            values = self.function(**given)
            if inspect.isawaitable(values):
                values = asyncio.run(_awaited(values))
        except RewardFunctionError:
            raise
        except Exception as err:
            raise RewardFunctionError(
                f"reward function {self.reference} raised on a batch of {len(completions)} answers "
                f"(first prompt: {_shown(prompts[0]) if prompts else '-'}): {err!r}"
            ) from err
        return self.checked(values, prompts)

    def checked(self, values: Any, prompts: list[list[dict]]) -> list[float | None]:
        """One finite number (or None, when allowed) per answer; else an error naming the answer."""
        if hasattr(values, "tolist"):  # a numpy array or a tensor
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardFunctionError(
                f"reward function {self.reference} returned {size} for {len(prompts)} answers: "
                "return a list with one number (or None) per completion"
            )
        out = []
        for row, value in enumerate(values):
            if value is None:
                if not self.allow_none:
                    raise RewardFunctionError(
                        f"reward function {self.reference} gave no score (None) to answer {row} (prompt: "
                        f"{_shown(prompts[row])}) and no other reward scores it: list it with a reward that "
                        "does, or return a number"
                    )
                self.unscored += 1
                out.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardFunctionError(
                    f"reward function {self.reference} returned {value!r} for answer {row} (prompt: "
                    f"{_shown(prompts[row])}): a reward is a finite number or None"
                )
            out.append(float(value))
        return out


async def _awaited(awaitable):
    return await awaitable


def _shown(prompt: list[dict] | str) -> str:
    text = prompt if isinstance(prompt, str) else (prompt[-1]["content"] if prompt else "")
    return repr(text if len(text) <= 60 else text[:57] + "...")
