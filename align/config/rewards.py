"""Reward specs: what scores an answer - RL rewards, the sample stage's ranking, the checkup and eval
judges. One typed union, read from `{type: rule|learned|judge|remote|openai, ...}` or a list of them
(a weighted sum). Checks rule names and options against reward_models/rules.py when a recipe is read."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from align.config.base import _Strict, did_you_mean


# Reward specs: what scores an answer, for RL rewards, the sample stage's ranking, the checkup and eval
# judges. One typed union, read from `{type: rule|learned|judge, ...}` or a list of them (a weighted sum).
class _RewardSpec(_Strict):
    weight: float = Field(1.0, description="its weight when it is one of a list (the reward is the weighted sum)")

    @field_validator("weight", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"weight must be a number, got {value!r}")
        return value


class RuleSpec(_RewardSpec):
    """A function of reward_models/rules.py; its keyword options are keys beside ``name``."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    type: Literal["rule"]
    name: str = Field(..., description="a rule of reward_models/rules.py, e.g. gsm8k_exact")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _a_known_rule(self):
        from reward_models.rules import RULES, options_of  # the rule functions only

        if self.name not in RULES:
            raise ValueError(
                f"unknown rule {self.name!r}{did_you_mean(self.name, RULES)} (rules: {', '.join(sorted(RULES))})"
            )
        allowed = options_of(self.name)
        for key in sorted(set(self.options) - set(allowed)):
            keys = ", ".join(["name", "weight", *allowed])
            raise ValueError(f"rule {self.name!r} has no key {key!r}{did_you_mean(key, allowed)} (keys: {keys})")
        return self


class LearnedSpec(_RewardSpec):
    """A Bradley-Terry reward model trained by an rm stage."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    type: Literal["learned"]
    from_stage: str | None = Field(None, alias="from", description="the rm stage of this recipe that trained it")
    path: str | None = Field(None, description="or a finished rm stage folder")
    batch_size: int = Field(8, gt=0, description="answers scored per forward pass")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.from_stage is None) == (self.path is None):
            raise ValueError(
                "a learned reward needs from or path: from (an rm stage of this recipe) or path (a folder), one of them"
            )
        return self


class JudgeSpec(_RewardSpec):
    """An instruct model asked which answer is better (pairwise) or how good one answer is (pointwise)."""

    type: Literal["judge"]
    model: str = Field(..., description="model alias, folder or .gguf")
    mode: str = Field("pairwise", description="pairwise (both orders, position bias reported) or pointwise")
    batch_size: int = Field(4, gt=0, description="prompts judged per forward pass")

    @field_validator("mode")
    @classmethod
    def _a_mode(cls, value: str) -> str:
        if value not in ("pairwise", "pointwise"):
            raise ValueError(f"judge mode must be pairwise or pointwise, not {value!r}")
        return value


class _HttpSpec(_RewardSpec):
    """What every reward behind an HTTP endpoint shares: the key's variable, patience, limits, cache."""

    api_key_env: str | None = Field(
        None,
        description="name of the environment variable holding the API key (sent as a Bearer token); the key itself "
        "is never written to a recipe, config.yaml or the cache",
    )
    timeout: float = Field(60.0, gt=0, description="seconds to wait for one response")
    retries: int = Field(3, ge=0, description="retries of a request that timed out or got 429/5xx, with backoff")
    concurrency: int = Field(4, gt=0, description="requests in flight at once")
    max_requests: int | None = Field(
        None,
        gt=0,
        description="stop the stage cleanly after this many requests sent by this process (cached answers are free; "
        "resume continues)",
    )
    cache: bool = Field(
        True, description="keep every response on disk keyed by its request, so a resumed or re-run stage pays once"
    )

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "a").isalnum():
            raise ValueError(
                f"api_key_env names an environment variable (e.g. OPENAI_API_KEY), not a key: got {value[:4]}..."
            )
        return value


class RemoteSpec(_HttpSpec):
    """A reward model or verifier served over HTTP: POST {prompts, completions, columns} -> {rewards: [...]}."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    type: Literal["remote"]
    url: str = Field(..., description="the endpoint (http or https) that scores a batch")
    batch_size: int = Field(16, gt=0, description="answers per request")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {value!r}")
        return value


class OpenAIJudgeSpec(_HttpSpec):
    """An LLM judge behind an OpenAI-compatible chat completions API (OpenAI, vLLM serve, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    type: Literal["openai"]
    model: str = Field(..., description="the model name the API serves")
    base_url: str = Field("https://api.openai.com/v1", description="the API's base URL (…/v1)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    mode: str = Field("pairwise", description="pairwise (both orders, position bias reported) or pointwise")

    _a_mode = field_validator("mode")(JudgeSpec._a_mode.__func__)


class PythonSpec(_RewardSpec):
    """A Python function of the user's, called as TRL's GRPOTrainer calls its reward_funcs: reward_models/python.py.
    Reading a recipe imports nothing: the file is imported when the stage that names it builds its rewards."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    type: Literal["python"]
    function: str = Field(
        ...,
        description="FILE.py:NAME (a path from the folder you run align in) or package.module:NAME (importable)",
    )
    format: Literal["conversational", "standard"] = Field(
        "conversational",
        description="what the function is given: conversational (TRL's form for chat data, the default) - prompts "
        "as message lists, completions as [{role: assistant, content}]; standard - the prompt's and the answer's text",
    )

    @field_validator("function")
    @classmethod
    def _file_or_module_and_name(cls, value: str) -> str:
        where, _, name = value.rpartition(":")
        if not where or not name.isidentifier():
            raise ValueError(
                f"function must be FILE.py:NAME or package.module:NAME, got {value!r} (e.g. rewards.py:format_reward)"
            )
        return value


REWARD_SPECS: dict[str, type[_RewardSpec]] = {
    "rule": RuleSpec,
    "learned": LearnedSpec,
    "judge": JudgeSpec,
    "remote": RemoteSpec,
    "openai": OpenAIJudgeSpec,
    "python": PythonSpec,
}
RewardSpec = Annotated[
    Union[RuleSpec, LearnedSpec, JudgeSpec, RemoteSpec, OpenAIJudgeSpec, PythonSpec], Field(discriminator="type")
]
RewardSpecs = Union[RewardSpec, list[RewardSpec]]


def parse_reward(value: Any, where: str = "reward") -> Any:
    """A spec or a list of them, typed; errors name the part (``reward[1]``), the key and the nearest
    right spelling. Loads nothing: folders and models are checked where they are read."""
    if isinstance(value, list) and not value:
        raise ValueError(f"{where} is an empty list; give at least one {{type: rule|learned|judge, ...}}")
    parts = []
    for index, part in enumerate(value if isinstance(value, list) else [value]):
        here = f"{where}[{index}]" if isinstance(value, list) else where
        if isinstance(part, _RewardSpec):
            parts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValueError(f"{here} must be a mapping {{type: rule|learned|judge, ...}}, got {part!r}")
        kind = part.get("type")
        if kind not in REWARD_SPECS:
            raise ValueError(
                f"{here}: type must be rule, learned, judge, remote, openai or python, not {kind!r}"
                + did_you_mean(kind, REWARD_SPECS)
            )
        try:
            parts.append(REWARD_SPECS[kind].model_validate(part))
        except ValidationError as err:
            raise ValueError(f"{here}: " + "; ".join(_spec_problem(kind, e) for e in err.errors())) from None
    return parts if isinstance(value, list) else parts[0]


def _spec_problem(kind: str, error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = [f.alias or name for name, f in REWARD_SPECS[kind].model_fields.items() if name != "type"]
        return f"a {kind} reward has no key {key!r}{did_you_mean(key, allowed)} (keys: {', '.join(allowed)})"
    message = error["msg"].removeprefix("Value error, ")
    return message if not key or error["type"] == "value_error" else f"{key}: {message}"


def reward_parts(spec: Any) -> list:
    """The specs of a reward (one, or each of a weighted list); [] for none."""
    return [] if spec is None else list(spec) if isinstance(spec, list) else [spec]


def has_pairwise(spec: Any) -> bool:
    """Whether any part of a reward is a pairwise judge (it compares two answers; it cannot score one)."""
    return any(getattr(part, "mode", None) == "pairwise" for part in reward_parts(spec))
