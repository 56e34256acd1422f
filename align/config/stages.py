"""The stage kinds that train or read offline (sft, dpo, orpo, kto, rm, sample, eval), the base they
share, and the helpers that read any stage's config."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from align.config.base import _Strict
from align.config.rewards import RewardSpecs, _RewardSpec, has_pairwise, parse_reward, reward_parts
from align.config.sections import (
    AdapterConfig,
    CheckupConfig,
    DataConfig,
    EvalRolloutConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    RolloutConfig,
    TrackingConfig,
    TrainConfig,
)


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


def reward_specs(config: StageConfig) -> list:
    """Every reward spec part a stage's config names: its reward, judges, best-of baselines' and monitors'
    rewards (not the checkup's: a stage does not depend on the reward its checkup reports).

    >>> from align.config import EvalConfig, RewardConfig
    >>> judged = EvalConfig(judges={"j": {"type": "rule", "name": "gsm8k_exact"}}, data={"eval": "e.jsonl"})
    >>> [s.name for s in reward_specs(judged)]
    ['gsm8k_exact']
    >>> reward_specs(RewardConfig())
    []
    """
    specs = reward_parts(getattr(config, "reward", None))
    for judge in (getattr(config, "judges", None) or {}).values():
        specs += reward_parts(judge)
    for baseline in getattr(config, "baselines", None) or []:
        specs += [] if isinstance(baseline, str) else reward_parts(baseline.reward)
    for monitor in getattr(getattr(config, "monitor", None), "rewards", {}).values():
        specs += reward_parts(monitor)
    return [s for s in specs if isinstance(s, _RewardSpec)]  # an rm stage's `reward:` is its options, not a spec


def stage_references(config: StageConfig) -> list[tuple[str, str]]:
    """(key, stage name) for every stage a config names through `from:` (its own, a reward's, a judge's)."""
    reward = getattr(config, "reward", None)
    specs = reward_specs(config)
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
