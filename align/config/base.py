"""What every schema shares: strict models (an unknown key is an error) and the recipe error."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def did_you_mean(word: Any, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" - did you mean {match[0]!r}?" if match else ""
