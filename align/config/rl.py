"""The online RL stage kinds (grpo, ppo): their algorithm options, monitors and the base they share."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from align.config.base import _Strict
from align.config.rewards import RewardSpecs, parse_reward
from align.config.sections import GRPORolloutConfig, RLRolloutConfig
from align.config.stages import StageConfig


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


class PtxConfig(_Strict):
    """InstructGPT's PPO-ptx: the SFT loss on other data, added to every optimizer step of an RL stage, so
    what that data asks of the policy is kept while RL moves it (the alignment tax, paid less)."""

    coef: float = Field(
        0.0,
        ge=0,
        description="weight of the SFT loss (mean -log p per labelled token) of ptx.data in each optimizer step's "
        "loss; 0 = off (the update is exactly the one without ptx)",
    )
    data: list[str] = Field(
        default_factory=list,
        description="SFT files (messages, prompt+completion, instruction+output, chosen+rejected) of general or task "
        "text, e.g. data/chitchat/train.jsonl; prompts are masked as in sft",
    )
    rows: int = Field(8, gt=0, description="ptx rows in each optimizer step (all processes together)")
    max_length: int | None = Field(None, gt=0, description="tokens per ptx row (none = data.max_length)")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _coef_and_data(self):
        if self.coef > 0 and not self.data:
            raise ValueError("ptx.coef > 0 needs ptx.data: the SFT file(s) whose loss is mixed into each update")
        if self.data and self.coef == 0:
            raise ValueError("ptx.data is mixed in only with ptx.coef > 0 (e.g. 0.1); set it, or drop ptx.data")
        return self


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
    ptx: PtxConfig = Field(default_factory=PtxConfig)

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
