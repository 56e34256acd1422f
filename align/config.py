"""The recipe schemas: one pydantic model per stage kind, and the sections they share.

This module imports nothing from align, so every layer may use it (a test walks the imports).
Loading YAML, overrides and the stage graph are in align/recipe.py; which kinds exist, and what
each one runs, is in align/stages/registry.py.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2-135m-instruct", description="alias, local folder, .gguf file, or hub id already in the local cache"
    )
    revision: str | None = Field(None, description="hub revision, for hub ids only")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model; off unless you trust its author"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute precision; auto = bf16 where the hardware has it, else fp32"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel passed to transformers")
    chat_template: str | None = Field(
        None, description="'chatml' or a .jinja file, used when the tokenizer has no chat template"
    )


class QuantizationConfig(_Strict):
    mode: Literal["none", "nf4", "fp4", "int8"] = Field(
        "nf4", description="bitsandbytes quantization of the frozen base; none for LoRA or full fine-tuning"
    )
    double_quant: bool = Field(True, description="quantize the 4-bit quantization constants too (QLoRA)")


class AdapterConfig(_Strict):
    method: Literal["lora", "ia3", "vera", "loha", "lokr", "oft", "adalora", "full"] = Field(
        "lora", description="peft method, or full to train every weight"
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or all-linear"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the peft config of this method"
    )


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="adapter rank (also used by vera, loha, lokr, adalora)")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rslora)"
    )
    # 0 by default: LoRA dropout keeps a dropped copy of every adapted layer's input for backward - the
    # largest activation cost of a QLoRA step (BENCHMARKS.md) - and with it DPO's first loss is not ln 2
    # nor RL's first ratios 1.
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (0: off)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of B = ratio x learning rate of A"
    )


def named_sets(data: Any, files_key: str, sets_key: str, section: str) -> Any:
    """A section's {files_key: {name: file or [files]}} -> {sets_key: {name: [files]}} and files_key the
    files of every set in order (how data.eval and checkup.prompts take named held-out sets)."""
    sets = data.get(files_key) if isinstance(data, dict) else None
    if not isinstance(sets, dict):
        return data
    if not sets:
        raise ValueError(
            f"{section}.{files_key}: an empty map of held-out sets; name at least one, e.g. {{task: FILE}}"
        )
    named = {}
    for name, files in sets.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ValueError(f"{section}.{files_key}: {name!r} is not a plain set name (letters, digits, _ . -)")
        named[str(name)] = [files] if isinstance(files, str) else files
    if data.get(sets_key) not in (None, {}, named):
        raise ValueError(f"give the held-out sets in {section}.{files_key} ({{name: file}}) or in {sets_key}, not both")
    return {**data, files_key: [f for files in named.values() for f in files], sets_key: named}


def check_sets(sets: dict[str, list[str]], files: list[str], sets_key: str, files_key: str) -> None:
    if sets and [f for group in sets.values() for f in group] != files:
        raise ValueError(f"{sets_key} and {files_key} name different files; write {files_key}: {{name: file}}")


class DataConfig(_Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    from_stage: str | None = Field(
        None,
        alias="from",
        description="a sample stage whose pairs this stage trains on (dpo, rm): its pairs.jsonl becomes data.train "
        "and its held-out eval_pairs.jsonl data.eval",
    )
    train: list[str] = Field(
        default_factory=list,
        description="training files or HF dataset folders (json, jsonl, parquet, csv); a list of {path, weight} "
        "makes a weighted mixture (see train_weights)",
    )
    train_weights: list[float] | None = Field(
        None,
        description="sampling weights of the train files, in order (written as data.train: [{path, weight}]): the "
        "mixture draws max_rows rows (or as many as the files hold) in these proportions, repeating a small file's "
        "rows and leaving part of a large one's out, seeded; none = every row once",
    )
    eval: list[str] = Field(
        default_factory=list, description="held-out files; if empty, eval_rows are held out from train"
    )
    eval_sets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="named held-out sets, written as data.eval: {name: file or [files]} (eval stages): each set gets "
        "its own win-rate table; data.eval then lists all their files",
    )
    eval_rows: int = Field(0, ge=0, description="rows held out from train for evaluation when no eval file is given")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "preference"] = Field(
        "auto",
        description="SFT row format; auto detects it from the keys of the first row (preference: SFT on a pair's "
        "chosen answer)",
    )
    system_prompt: str | None = Field(None, description="system message added to rows that have none")
    max_length: int = Field(
        1024,
        gt=8,
        description="tokens per example; longer rows are truncated, or dropped when nothing trainable is left",
    )
    max_rows: int | None = Field(None, gt=0, description="use at most this many training rows (after shuffling)")
    max_eval_rows: int | None = Field(None, gt=0, description="use at most this many held-out rows")
    packing: bool = Field(
        False, description="pack several examples into one row of max_length tokens (no attention across examples)"
    )
    shared_prompt: bool = Field(
        True,
        description="rm, dpo and orpo: each pair is one row [prompt, chosen, rejected] and its prompt runs through "
        "the model once; a mask keeps the answers apart (same results, fewer tokens). Off, for models whose "
        "layers are not all full attention (sliding windows, recurrent layers), attention that takes no custom "
        "mask (flash_attention_2) or orpo.sft_on_prompt: two padded rows a pair (the plan says which)",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop before training, naming file, row and field; skip: drop and count"
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _named_eval_sets(cls, data: Any) -> Any:
        """data.eval: {name: file or [files]} -> eval_sets, and eval the files of every set in order."""
        return named_sets(data, "eval", "eval_sets", "data")

    @model_validator(mode="after")
    def _sets_are_the_eval_files(self):
        check_sets(self.eval_sets, self.eval, "data.eval_sets", "data.eval")
        return self

    def held_out_sets(self) -> dict[str, list[str]]:
        """{set name: files}: the named sets, or data.eval as one set named held_out."""
        return dict(self.eval_sets) if self.eval_sets else {"held_out": list(self.eval)} if self.eval else {}

    @model_validator(mode="before")
    @classmethod
    def _weighted_files(cls, data: Any) -> Any:
        """data.train: [{path, weight}, ...] (a bare path weighs 1) -> train + train_weights."""
        files = data.get("train") if isinstance(data, dict) else None
        if not isinstance(files, list) or not any(isinstance(f, dict) for f in files):
            return data
        if data.get("train_weights") is not None:
            raise ValueError("give the weights in data.train ({path, weight}) or in data.train_weights, not both")
        paths, weights = [], []
        for index, entry in enumerate(files):
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - {"path", "weight"})
                if unknown or "path" not in entry:
                    raise ValueError(
                        f"data.train[{index}]: a weighted file is {{path, weight}}, got keys {sorted(entry)}"
                    )
                paths.append(entry["path"])
                weights.append(entry.get("weight", 1.0))
            else:
                paths.append(entry)
                weights.append(1.0)
        return {**data, "train": paths, "train_weights": weights}

    @model_validator(mode="after")
    def _a_weight_per_file(self):
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train):
                raise ValueError(
                    f"data.train_weights has {len(self.train_weights)} weights for {len(self.train)} train files"
                )
            bad = [w for w in self.train_weights if isinstance(w, bool) or not w > 0]
            if bad:
                raise ValueError(f"data.train weights must be numbers above 0, got {bad[0]!r}")
        return self


class TrainConfig(_Strict):
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, gt=0, description="examples per device per micro-batch")
    grad_accum: int = Field(
        1, gt=0, description="micro-batches per optimizer step; the loss is normalised by the tokens of the whole step"
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule"
    )
    optim: str = Field(
        "adamw_torch",
        description="transformers optimizer name: adamw_torch, adamw_torch_fused, paged_adamw_8bit, sgd, ...",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 disables)")
    # On by default (as in TRL's configs): with LoRA dropout off, checkpointing every layer trains SFT at
    # 1.59x TRL's speed in 0.85x its memory (BENCHMARKS.md, "Choosing the SFT default").
    gradient_checkpointing: bool | float = Field(
        True,
        description="recompute activations in backward: true = every decoder layer (least memory, about 25% slower); "
        "a share 0-1 = that share of the layers, evenly spread (memory and time in between); false = none",
    )
    logging_steps: int = Field(1, gt=0, description="log metrics every N optimizer steps")
    save_steps: int = Field(100, gt=0, description="write a resumable checkpoint every N optimizer steps")
    save_total_limit: int = Field(
        2, ge=2, description="checkpoints kept on disk (at least 2: the newest may be mid-save when killed)"
    )
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="evaluate on the held-out rows every N steps (always before the first step and after the last)",
    )

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpoint_share(cls, value: bool | float) -> bool | float:
        if not isinstance(value, bool) and not 0 <= value <= 1:
            raise ValueError(f"a share of the decoder layers is between 0 and 1, not {value}")
        return value

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            raise ValueError(f"unknown optimizer {value!r}" + (f" - did you mean {close[0]!r}?" if close else ""))
        return value


class TrackingConfig(_Strict):
    wandb: bool = Field(False, description="also log to Weights & Biases (offline unless a key is configured)")
    trackio: bool = Field(
        False, description="also log to trackio (local-first: a SQLite store in TRACKIO_DIR; `trackio show` views it)"
    )
    project: str = Field("align", description="wandb / trackio project")

    @field_validator("trackio")
    @classmethod
    def _trackio_installed(cls, value: bool) -> bool:
        import importlib.util

        if value and importlib.util.find_spec("trackio") is None:
            raise ValueError(
                "trackio is not installed: pip install trackio (or align's extra: pip install 'align[trackio]')"
            )
        return value


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
                f"unknown rule {self.name!r}{_did_you_mean(self.name, RULES)} (rules: {', '.join(sorted(RULES))})"
            )
        allowed = options_of(self.name)
        for key in sorted(set(self.options) - set(allowed)):
            keys = ", ".join(["name", "weight", *allowed])
            raise ValueError(f"rule {self.name!r} has no key {key!r}{_did_you_mean(key, allowed)} (keys: {keys})")
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


REWARD_SPECS: dict[str, type[_RewardSpec]] = {
    "rule": RuleSpec,
    "learned": LearnedSpec,
    "judge": JudgeSpec,
    "remote": RemoteSpec,
    "openai": OpenAIJudgeSpec,
}
RewardSpec = Annotated[
    Union[RuleSpec, LearnedSpec, JudgeSpec, RemoteSpec, OpenAIJudgeSpec], Field(discriminator="type")
]
RewardSpecs = Union[RewardSpec, list[RewardSpec]]


def _did_you_mean(word: Any, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f" - did you mean {match[0]!r}?" if match else ""


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
                f"{here}: type must be rule, learned or judge, not {kind!r}{_did_you_mean(kind, REWARD_SPECS)}"
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
        return f"a {kind} reward has no key {key!r}{_did_you_mean(key, allowed)} (keys: {', '.join(allowed)})"
    message = error["msg"].removeprefix("Value error, ")
    return message if not key or error["type"] == "value_error" else f"{key}: {message}"


def reward_parts(spec: Any) -> list:
    """The specs of a reward (one, or each of a weighted list); [] for none."""
    return [] if spec is None else list(spec) if isinstance(spec, list) else [spec]


def has_pairwise(spec: Any) -> bool:
    """Whether any part of a reward is a pairwise judge (it compares two answers; it cannot score one)."""
    return any(getattr(part, "mode", None) == "pairwise" for part in reward_parts(spec))


class CheckupConfig(_Strict):
    prompts: list[str] = Field(
        default_factory=list,
        description="held-out prompt files of the recipe's task: every policy stage (sft, dpo, grpo, ppo) "
        "answers them greedily at its start and its end and reports what changed (empty = no checkup); or a map "
        "{name: file} of named sets, each measured and alarmed on apart (the first is the task)",
    )
    sets: dict[str, list[str]] = Field(
        default_factory=dict, description="the named sets when checkup.prompts is a map (prompts lists their files)"
    )
    max_prompts: int = Field(32, gt=0, description="prompts used per set, from the top of its files")
    reward: RewardSpecs | None = Field(
        None, description="the task's verifier or reward on those answers, e.g. {type: rule, name: gsm8k_exact}"
    )
    max_new_tokens: int = Field(128, gt=0, description="answer tokens at most")
    alarm: bool = Field(
        True,
        description="a stage past a threshold below is marked collapsed and stops the pipeline (false: report only)",
    )
    max_kl: float = Field(
        1.0,
        gt=0,
        description="KL per token from the stage's start, on its own answers (dpo, grpo, ppo; sft is meant to move far "
        "from the base)",
    )
    max_loop_rise: float = Field(0.25, gt=0, description="rise of the share of answers stuck in a repeated n-gram loop")
    max_cutoff_rise: float = Field(
        0.25, gt=0, description="rise of the share of answers cut off at max_new_tokens (answers that no longer end)"
    )
    max_reward_drop: float = Field(0.15, gt=0, description="fall of the mean reward on the checkup prompts")
    general: str | None = Field(
        "builtin",
        description="general-ability probe (the alignment tax): reference texts whose answers' log-likelihood per "
        "token is measured under the policy, its start and the base; builtin: chit-chat, worked word problems and "
        "summaries shipped with align; or a .jsonl file / folder of messages rows; null = off",
    )
    general_rows: int = Field(
        8,
        gt=0,
        description="reference texts read per kind (file) of the general probe, from the top; 256 tokens each at most",
    )
    max_general_drop: float = Field(
        0.15,
        gt=0,
        description="fall of the general probe's mean log-likelihood from the stage's start (nats per token) past "
        "which the alarm goes off",
    )
    max_chosen_drop: float = Field(
        0.5,
        gt=0,
        description="dpo, kto: fall of the chosen answers' log-probability per token below the reference's past which "
        "training stops if the pairs do not separate too (the rejected falling further, most pairs ranked right); "
        "a fall while they separate is reported as likelihood displacement, not a collapse",
    )

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _named_sets(cls, data: Any) -> Any:
        """checkup.prompts: {name: file or [files]} -> sets, and prompts the files of every set in order."""
        return named_sets(data, "prompts", "sets", "checkup")

    @model_validator(mode="after")
    def _sets_are_the_files(self):
        check_sets(self.sets, self.prompts, "checkup.sets", "checkup.prompts")
        return self

    def prompt_sets(self) -> dict[str, list[str]]:
        """{set name: files}: the named sets, or checkup.prompts as one set named task."""
        return dict(self.sets) if self.sets else {"task": list(self.prompts)} if self.prompts else {}

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_shape(cls, value: Any) -> Any:
        if value is None:
            return value
        value = parse_reward(value)
        if any(getattr(part, "from_stage", None) for part in reward_parts(value)):
            raise ValueError(
                "checkup.reward is shared by every stage, those before a reward stage too: use a rule, or a reward "
                "model by its folder ({type: learned, path: ...}), not from: a stage"
            )
        return value


class StageConfig(_Strict):
    """Sections every stage has. ``kind`` picks the stage's schema."""

    kind: str
    seed: int = Field(0, description="seed for data order, adapter init and sampling")
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkup: CheckupConfig = Field(default_factory=CheckupConfig)

    # True for the kinds that train on preference pairs, so `data.from` may name a sample stage.
    READS_PAIRS: ClassVar[bool] = False
    # Whether the checkup's collapse alarm reads the KL to the stage's start (checkup.max_kl).
    CHECKUP_KL_ALARM: ClassVar[bool] = True

    # Shared keys this stage kind does not use -> why. Setting one to anything but its default is an
    # error for that stage (STYLE 13: every accepted key is a used key), never a silent no-op.
    UNUSED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _no_ignored_settings(self):
        for key, why in self.UNUSED.items():
            section, _, name = key.partition(".")
            value = getattr(getattr(self, section), name)
            default = type(getattr(self, section)).model_fields[name].get_default(call_default_factory=True)
            if value != default:
                raise ValueError(
                    f"{key}={value!r} has no effect in a {self.kind} stage ({why}); remove it for this stage"
                )
        if not self.data.shared_prompt and not self.READS_PAIRS:
            raise ValueError(
                f"data.shared_prompt=False has no effect in a {self.kind} stage (it lays out preference pairs); "
                "remove it for this stage"
            )
        if self.data.eval_sets and self.kind != "eval":
            raise ValueError(
                f"data.eval as a map of named sets is read by eval stages; a {self.kind} stage holds out one set "
                "(data.eval: FILE or [FILES])"
            )
        if self.data.from_stage is not None and not self.READS_PAIRS:
            raise ValueError(
                f"data.from={self.data.from_stage!r}: a {self.kind} stage does not train on preference pairs "
                "(data.from is for dpo and rm stages that train on a sample stage's pairs)"
            )
        return self


class SFTConfig(StageConfig):
    """Supervised fine-tuning with prompt-masked labels."""

    kind: Literal["sft"] = "sft"
    # SFT starts from the base and is meant to move far from it (0.82 nats/token measured for the
    # quickstart's format); its checkup alarms on loops and a falling reward, not on the KL.
    CHECKUP_KL_ALARM: ClassVar[bool] = False


class DPOOptions(_Strict):
    loss: Literal["sigmoid", "cdpo", "robust", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), cdpo (label smoothing), robust, ipo, simpo (reference-free)"
    )
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (SimPO: reward scale)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate for cdpo and robust")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin")
    rpo_alpha: float | None = Field(None, ge=0, description="add alpha x the SFT loss on chosen answers (RPO)")
    reference: Literal["precomputed", "live"] = Field(
        "precomputed",
        description="precomputed: reference logprobs computed once before training; live: every step (adapter disabled "
        "/ frozen start adapter)",
    )

    @model_validator(mode="after")
    def _smoothing_where_needed(self):
        if self.loss in ("cdpo", "robust") and self.label_smoothing == 0:
            raise ValueError(f"dpo.loss={self.loss} needs dpo.label_smoothing > 0 (e.g. 0.1)")
        return self


class DPOConfig(StageConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["dpo"] = "dpo"
    READS_PAIRS: ClassVar[bool] = True
    UNUSED: ClassVar[dict[str, str]] = {
        "data.packing": "pairs are scored as pair rows (data.shared_prompt), never packed"
    }
    from_stage: str | None = Field(
        None, alias="from", description="stage whose adapter this one starts from (e.g. sft); none = a fresh adapter"
    )
    dpo: DPOOptions = Field(default_factory=DPOOptions)


class ORPOOptions(_Strict):
    beta: float = Field(
        0.1, gt=0, description="lambda: weight of the odds-ratio term beside the SFT loss (TRL's ORPOConfig.beta)"
    )
    sft_on_prompt: bool = Field(
        False,
        description="the SFT term also scores the prompt tokens, as TRL's ORPOTrainer does; false = the chosen "
        "answer only, as align's sft stage",
    )


class ORPOConfig(StageConfig):
    """ORPO (Hong et al. 2024): the SFT loss on the chosen answers plus an odds-ratio preference term, in
    one stage and with no reference model; starts from the base (or from: a policy stage)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["orpo"] = "orpo"
    READS_PAIRS: ClassVar[bool] = True
    # like sft, ORPO teaches the answers from the base and is meant to move far from its start
    CHECKUP_KL_ALARM: ClassVar[bool] = False
    UNUSED: ClassVar[dict[str, str]] = DPOConfig.UNUSED
    from_stage: str | None = Field(
        None, alias="from", description="stage whose adapter this one starts from; none = a fresh adapter on the base"
    )
    orpo: ORPOOptions = Field(default_factory=ORPOOptions)


class KTOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference, as DPO's")
    desirable_weight: float = Field(
        1.0, gt=0, description="weight of the desirable (label: true) examples' loss (lambda_D)"
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="weight of the undesirable (label: false) examples' loss (lambda_U); the paper keeps "
        "lambda_D n_D / (lambda_U n_U) in [1, 4/3], and the plan says when the data's counts do not",
    )
    reference: Literal["precomputed", "live"] = Field(
        "precomputed",
        description="precomputed: reference logprobs computed once before training; live: every step (adapter disabled "
        "/ frozen start adapter)",
    )


class KTOConfig(StageConfig):
    """KTO (Ethayarajh et al. 2024) on unpaired answers labelled desirable or not: a policy stage."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["kto"] = "kto"
    READS_PAIRS: ClassVar[bool] = True  # a pair is two examples: chosen desirable, rejected not
    UNUSED: ClassVar[dict[str, str]] = {
        "data.packing": "each answer and its mismatched KL answer are scored as separate padded rows, never packed",
        "data.shared_prompt": "the mismatched KL answers are scored in a pass of their own without gradient, so each "
        "answer has its own row",
    }
    from_stage: str | None = Field(
        None, alias="from", description="stage whose adapter this one starts from (e.g. sft); none = a fresh adapter"
    )
    kto: KTOOptions = Field(default_factory=KTOOptions)


class RewardOptions(_Strict):
    margin: bool = Field(False, description="subtract each pair's 'margin' column inside the sigmoid (Llama-2 style)")
    center_coef: float = Field(0.0, ge=0, description="weight of mean((r_c + r_r)^2): keeps scores centred near 0")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate")


class RewardConfig(StageConfig):
    """A Bradley-Terry reward model: the policy's base with an adapter and a scalar head."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["rm"] = "rm"
    READS_PAIRS: ClassVar[bool] = True
    UNUSED: ClassVar[dict[str, str]] = {
        "data.packing": "each answer is scored at its own last token, so rows are never packed"
    }
    from_stage: str | None = Field(
        None,
        alias="from",
        description="a policy stage (e.g. sft) whose adapter weights start this reward model's adapter, as "
        "InstructGPT starts its reward model from the SFT model: it reads answers with what the policy learned of "
        "the task; the scalar head starts new. That stage's adapter must have this stage's shape (adapter, lora)",
    )
    reward: RewardOptions = Field(default_factory=RewardOptions)


class RolloutConfig(_Strict):
    engine: Literal["auto", "hf", "vllm", "server"] = Field(
        "auto",
        description="auto: vllm when it is installed and can serve the policy, else hf; server: a vLLM server you "
        "started (rollout.server_url; recipes/server/README.md)",
    )
    prompts_per_step: int = Field(8, gt=0, description="prompts sampled for each RL step")
    samples_per_prompt: int = Field(1, gt=0, description="completions per prompt (GRPO/RLOO groups need >= 2)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the trainer's logprobs use the same one")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(
        128, gt=0, description="completion tokens at most; longer ones are cut and count as truncated"
    )
    stop: list[str] = Field(
        default_factory=list, description="strings that end a completion besides the end-of-turn token"
    )
    batch_size: int = Field(32, gt=0, description="hf engine: sequences per generate call")
    kv_cache_gib: float | Literal["auto"] = Field(
        "auto",
        description="vllm on CPU: KV-cache size in GiB; auto = what the stage's largest generate call holds at once "
        "(its sequences x (longest prompt + max_new_tokens)), at least one max-length sequence",
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vllm on GPU: its share of GPU memory, the rest is the trainer's"
    )
    engine_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="vllm: the dtype it serves the policy in; auto = the trainer's on GPU, fp32 on CPU (a bf16 CPU "
        "engine rounds every "
        "weight and answered unlike the trainer; bf16 is faster)",
    )
    vllm_sync: Literal["auto", "lora", "merged"] = Field(
        "auto",
        description="vllm with an adapter policy: lora (a LoRARequest per step), merged (deltas added to the "
        "dequantized base, weights pushed); auto: lora on GPU, merged on CPU",
    )
    server_url: str | None = Field(
        None, description="engine server: the vLLM server's address, e.g. http://gpu-node:8000 (its /v1 API)"
    )
    server_model: str | None = Field(
        None, description="engine server: the served base model's name; none = the server's only base model"
    )
    server_timeout: float = Field(
        600.0, gt=0, description="engine server: seconds one request may take before it is retried, then an error"
    )
    server_adapter_dir: str | None = Field(
        None,
        description="engine server: a folder the server can read where each adapter version is saved for it to load; "
        "none = a temporary folder on this machine (a server on another machine needs a shared folder)",
    )

    @field_validator("server_url")
    @classmethod
    def _an_http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"server_url must start with http:// or https://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _server_settings_with_the_server(self):
        if self.engine == "server" and self.server_url is None:
            raise ValueError("engine server needs server_url: the address of the vLLM server you started")
        if self.engine != "server":
            fields = type(self).model_fields
            used = sorted(k for k in fields if k.startswith("server_") and getattr(self, k) != fields[k].default)
            if used:
                raise ValueError(
                    f"{', '.join(used)} are used by engine server only (this rollout uses engine {self.engine})"
                )
        return self


class RLRolloutConfig(RolloutConfig):
    """Rollouts that train a policy (ppo, grpo)."""

    importance_correction: bool | Literal["auto"] = Field(
        "auto",
        description="truncated importance sampling: each token's policy loss x min(pi_trainer / pi_sampler, "
        "importance_cap); "
        "auto = true unless the sampler is the trainer's exact forward (hf in fp32)",
    )
    importance_cap: float = Field(3.0, gt=0, description="upper bound of the importance weight (TRL's default C_max)")
    log_samples_every: int = Field(
        10,
        ge=0,
        description="every N steps (and the first) the step's prompts, completions and rewards go to rollouts.jsonl "
        "and, when tracking is on, a wandb / trackio table; 0 = never",
    )


class GRPORolloutConfig(RLRolloutConfig):
    samples_per_prompt: int = Field(
        4, gt=0, description="completions per prompt: the group each advantage is relative to (>= 2)"
    )


class EvalRolloutConfig(RolloutConfig):
    """Eval's own defaults, which hold whether or not a recipe writes a rollout: section."""

    temperature: float = Field(
        0.7, gt=0, description="sampling temperature, the same for the policy and every baseline"
    )
    max_new_tokens: int = Field(256, gt=0, description="answer tokens at most")


class GRPOOptions(_Strict):
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: reward minus group mean (/ group std); rloo: minus the mean of the other samples"
    )
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std (false = Dr. GRPO)")
    loss_aggregation: Literal["token", "sequence", "constant"] = Field(
        "token",
        description="token: mean over all completion tokens (DAPO); sequence: per-completion mean, then mean (GRPO "
        "paper); constant: sum / (completions x max_new_tokens) (Dr. GRPO)",
    )
    clip: float = Field(0.2, gt=0, description="PPO clip range of the probability ratio")
    epochs: int = Field(1, gt=0, description="passes over each batch of rollouts")
    minibatch_size: int | None = Field(None, gt=0, description="completions per optimizer step; none = the whole batch")
    kl_coef: float = Field(
        0.0, ge=0, description="weight of the KL to the reference in the loss (0 = no reference needed)"
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator in the loss")
    dead_steps: int = Field(
        5,
        ge=0,
        description="stop when for this many steps every completion is truncated and rewards are all equal (0 = never)",
    )


class PPOOptions(_Strict):
    kl_coef: float = Field(0.05, ge=0, description="initial weight of the per-token KL penalty in the reward")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator in the reward penalty")
    target_kl: float | None = Field(
        None, gt=0, description="adapt kl_coef towards this KL per completion (Ziegler et al.); none = fixed"
    )
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL controller horizon, in completions")
    gamma: float = Field(1.0, gt=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip: float = Field(0.2, gt=0, description="value change clip range")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    value_lr: float | None = Field(None, gt=0, description="learning rate of the value head (none = train.lr)")
    value_head_init: Literal["zero", "reward"] = Field(
        "zero", description="reward: copy the learned reward model's head (same hidden size)"
    )
    epochs: int = Field(4, gt=0, description="PPO epochs over each batch of rollouts")
    minibatch_size: int | None = Field(None, gt=0, description="completions per optimizer step; none = the whole batch")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards of each batch (keeping their mean)")
    normalize_rewards: bool = Field(False, description="scale scores by a running std of all scores seen")
    reward_clip: float | None = Field(None, gt=0, description="clip scores to +-this after normalisation")
    missing_eos_penalty: float | None = Field(
        None, description="subtract this from the score of completions cut at max_new_tokens"
    )
    early_stop_kl: float | None = Field(
        None, gt=0, description="stop a step's PPO epochs once the approximate KL to the rollout policy exceeds this"
    )
    dead_steps: int = Field(
        5,
        ge=0,
        description="stop when for this many steps every completion is truncated and rewards are all equal (0 = never)",
    )


class MonitorConfig(_Strict):
    """Rewards the RL stage is judged by but never trained on (a gold verifier beside a learned proxy)."""

    rewards: dict[str, RewardSpecs] = Field(
        default_factory=dict,
        description="named reward specs scored on one answer per held-out prompt, beside the training reward on the "
        "same answers, e.g. {exact: {type: rule, name: gsm8k_exact}}; never part of the training reward",
    )
    every: int = Field(
        0, ge=0, description="RL steps between measurements; 0: before the first step and after the last only"
    )
    on_hacking: Literal["warn", "stop"] = Field(
        "warn",
        description="when the first monitor falls significantly below its best while the proxy is at or above its "
        "value there (paired over the held-out prompts): say so (warn), or say so and stop training (stop)",
    )
    select: Literal["best", "last"] = Field(
        "best",
        description="the stage's output: the policy of the measurement with the best first monitor (best), or of the "
        "last step (last)",
    )

    @model_validator(mode="after")
    def _settings_need_monitors(self):
        if not self.rewards and (self.every or self.on_hacking != "warn" or self.select != "best"):
            raise ValueError("monitor.every, on_hacking and select act on monitor.rewards: name at least one")
        return self

    @field_validator("rewards", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("monitor.rewards is a mapping of names to reward specs, e.g. {exact: {type: rule, ...}}")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or name == "proxy":
                raise ValueError(f"monitor.rewards: {name!r} is not a plain name (letters, digits, _ . -; not proxy)")
        return {name: parse_reward(spec, f"monitor.rewards.{name}") for name, spec in value.items()}


class _OnlineRLConfig(StageConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    UNUSED: ClassVar[dict[str, str]] = {
        "data.packing": "rollouts are sampled and scored per completion, never packed",
        "train.grad_accum": "the optimizer step is one minibatch of completions (grpo/ppo.minibatch_size); "
        "train.batch_size only splits it into micro-batches",
        "train.optim": "RL stages use torch AdamW (with train.lr and train.weight_decay)",
        "train.eval_steps": "RL stages measure their held-out rewards before the first step, every monitor.every "
        "steps and after the last",
        "lora.loraplus_lr_ratio": "RL stages use one learning rate for the whole adapter",
    }
    from_stage: str | None = Field(
        None, alias="from", description="stage whose adapter the policy starts from (e.g. sft); none = a fresh adapter"
    )
    reward: RewardSpecs = Field(
        ...,
        description="{type: rule, name: gsm8k_exact} | {type: learned, from: reward} | {type: judge, ...} | a list "
        "with weights",
    )
    rollout: RLRolloutConfig = Field(default_factory=RLRolloutConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_shape(cls, value: Any) -> Any:
        return parse_reward(value)

    @model_validator(mode="after")
    def _monitors_need_held_out_prompts(self):
        if self.monitor.rewards and not (self.data.eval or self.data.eval_rows):
            raise ValueError(
                "monitor.rewards are scored on held-out prompts: set data.eval (a prompt file) or data.eval_rows"
            )
        return self


class GRPOConfig(_OnlineRLConfig):
    """GRPO / RLOO: several samples per prompt, advantages relative to the group, clipped updates."""

    kind: Literal["grpo"] = "grpo"
    rollout: GRPORolloutConfig = Field(default_factory=GRPORolloutConfig)
    grpo: GRPOOptions = Field(default_factory=GRPOOptions)

    @model_validator(mode="after")
    def _groups(self):
        if self.rollout.samples_per_prompt < 2:
            raise ValueError("grpo needs rollout.samples_per_prompt >= 2 (advantages are relative to the group)")
        return self


class PPOConfig(_OnlineRLConfig):
    """PPO with a value head on the policy: per-token KL penalty, GAE, clipped policy and value losses."""

    kind: Literal["ppo"] = "ppo"
    ppo: PPOOptions = Field(default_factory=PPOOptions)


class SampleRolloutConfig(RolloutConfig):
    samples_per_prompt: int = Field(4, ge=2, description="answers per prompt; the best and the worst make a pair")


class SampleConfig(StageConfig):
    """Preference pairs from a policy's own answers: n samples per prompt, ranked by a reward."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["sample"] = "sample"
    UNUSED: ClassVar[dict[str, str]] = {"data.packing": "prompts are answered one by one, never packed"}
    from_stage: str | None = Field(
        None, alias="from", description="stage whose policy answers (e.g. sft); none = the base model"
    )
    reward: RewardSpecs = Field(
        ...,
        description="what ranks the answers: {type: rule, name: gsm8k_exact} | {type: learned, from: reward} | "
        "{type: judge, model: ..., mode: pointwise} | a list with weights",
    )
    rollout: SampleRolloutConfig = Field(default_factory=SampleRolloutConfig)
    tie_margin: float = Field(
        0.0,
        ge=0,
        description="a prompt whose best and worst scores differ by no more than this gives no pair (counted)",
    )
    pairs: Literal["best_vs_worst", "all"] = Field(
        "best_vs_worst",
        description="best_vs_worst: one pair per prompt; all: every answer against every answer it outscored by "
        "more than tie_margin (InstructGPT's K-choose-2 comparisons: more pairs for a reward model from the same "
        "samples; equal texts paired once)",
    )

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_shape(cls, value: Any) -> Any:
        value = parse_reward(value)
        if has_pairwise(value):
            raise ValueError("a sample stage scores each answer on its own: use a pointwise judge (mode: pointwise)")
        return value


class BestOfBaseline(_Strict):
    """A baseline that answers n times per prompt and keeps the answer a reward scores highest: best-of-n
    reranking, the cheap alternative to RL that an RL stage should beat (it reaches the reward's gains
    with no training and at far less distance from its start; Gao et al. 2022)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    best_of: int = Field(..., ge=2, le=64, description="answers drawn per prompt; the best one is judged")
    from_stage: str = Field(
        ..., alias="from", description="who answers: a stage name, 'base', or a model or stage folder"
    )
    reward: RewardSpecs = Field(
        ..., description="what picks the best answer, e.g. {type: learned, from: rm}; the first of equal scores"
    )
    name: str | None = Field(None, description="its name in the report; default <from>-best-of-<n>")

    @field_validator("reward", mode="before")
    @classmethod
    def _pointwise(cls, value: Any) -> Any:
        value = parse_reward(value, "best_of reward")
        if has_pairwise(value):
            raise ValueError("a best-of-n baseline scores each answer on its own: use a pointwise judge")
        return value

    @property
    def label(self) -> str:
        return self.name or f"{self.from_stage.rstrip('/').rsplit('/', 1)[-1]}-best-of-{self.best_of}"


class EvalConfig(StageConfig):
    """Win-rate of a policy against baselines on held-out prompts (data.eval), judged by rewards."""

    kind: Literal["eval"] = "eval"
    policy: str | None = Field(
        None,
        description="stage name (or finished stage folder) to evaluate; none = the last training stage before this one",
    )
    baselines: list[str | BestOfBaseline] = Field(
        default_factory=lambda: ["base"],
        description="compared with: stage names, 'base' (the recipe's model, no adapter), model/stage folders, or "
        "best-of-n rerankings: {best_of: 8, from: sft, reward: {type: learned, from: rm}}",
    )
    judges: dict[str, RewardSpecs] = Field(
        ..., description="name -> reward spec ({type: rule|learned|judge, ...}); each judge gets its own win-rate table"
    )
    rollout: EvalRolloutConfig = Field(
        default_factory=EvalRolloutConfig,
        description="sampling, identical for the policy and every baseline (fixed seeds)",
    )
    tie_margin: float = Field(
        0.0, ge=0, description="score differences within this count as ties (learned, rule and pointwise judges)"
    )
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the prompts for the 95% interval")
    examples: int = Field(5, ge=0, description="example pairs written to report.md")

    @field_validator("judges", mode="before")
    @classmethod
    def _judge_specs(cls, value: Any) -> Any:
        if not value:
            raise ValueError(
                "an eval stage needs at least one judge, e.g. judges: {correct: {type: rule, name: gsm8k_exact}}"
            )
        if not isinstance(value, dict):
            raise ValueError(f"judges is a mapping of name -> reward spec, got {value!r}")
        judges = {name: parse_reward(spec, f"judges.{name}") for name, spec in value.items()}
        for name, spec in judges.items():
            if isinstance(spec, list) and has_pairwise(spec):
                raise ValueError(
                    f"judge '{name}': a pairwise judge compares two answers itself; it cannot be part of a weighted sum"
                )
        return judges

    @model_validator(mode="after")
    def _prompts(self):
        if not self.data.eval:
            raise ValueError(
                "an eval stage reads its held-out prompts from data.eval (data.max_eval_rows caps how many)"
            )
        if self.rollout.samples_per_prompt != 1:
            raise ValueError("eval compares one answer per prompt: rollout.samples_per_prompt must be 1")
        names = [self.baseline_name(b) for b in self.baselines]
        twice = sorted({n for n in names if names.count(n) > 1} | ({self.policy} & set(names)))
        if twice:
            raise ValueError(f"baselines: {', '.join(map(str, twice))} named twice (give a best-of baseline a name:)")
        return self

    @staticmethod
    def baseline_name(baseline: str | BestOfBaseline) -> str:
        return baseline if isinstance(baseline, str) else baseline.label

    def baseline_sources(self) -> list[str]:
        """The stage, 'base' or folder that answers for each baseline (a best-of baseline's `from`)."""
        return [b if isinstance(b, str) else b.from_stage for b in self.baselines]


SHARED_SECTIONS = [name for name in StageConfig.model_fields if name != "kind"]


def stage_references(config: StageConfig) -> list[tuple[str, str]]:
    """(key, stage name) for every stage a config names through `from:` (its own, a reward's, a judge's)."""
    reward = getattr(config, "reward", None)
    specs = reward_parts(reward)
    for judge in (getattr(config, "judges", None) or {}).values():
        specs += reward_parts(judge)
    for baseline in getattr(config, "baselines", None) or []:
        specs += [] if isinstance(baseline, str) else reward_parts(baseline.reward)
    for monitor in getattr(getattr(config, "monitor", None), "rewards", {}).values():
        specs += reward_parts(monitor)
    found = [("from", config.from_stage)] if getattr(config, "from_stage", None) else []
    found += [("data from", config.data.from_stage)] if config.data.from_stage else []
    return found + [
        ("reward from" if reward else "judge from", s.from_stage) for s in specs if getattr(s, "from_stage", None)
    ]


def dump_config(config: StageConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def schema_of(kind: str) -> type[StageConfig]:
    """The schema whose ``kind`` is this, for reading a finished stage's config.yaml below the stage
    layer (models/ may not import the stage registry, which is where kinds are listed for use)."""
    found = {}
    pending = [StageConfig]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        default = cls.model_fields["kind"].default
        if isinstance(default, str):
            found[default] = cls
    if kind not in found:
        raise KeyError(kind)
    return found[kind]
