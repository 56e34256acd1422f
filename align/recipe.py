"""Recipe schema: one pydantic model per stage, loaded from YAML with dotted overrides.

A recipe file has shared sections at the top (model, quantization, adapter, lora, train, data,
tracking, seed) and an ordered ``stages:`` map. A stage's resolved config is the shared sections
deep-merged with that stage's own section, then the command line's ``key=value`` overrides.
Unknown keys are errors with a suggestion; YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align.artifacts import NAME_PATTERN


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field("smollm2-135m-instruct", description="alias, local folder, .gguf file, or hub id already in the local cache")
    revision: str | None = Field(None, description="hub revision, for hub ids only")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model; off unless you trust its author")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="compute precision; auto = bf16 where the hardware has it, else fp32")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel passed to transformers")
    chat_template: str | None = Field(None, description="'chatml' or a .jinja file, used when the tokenizer has no chat template")


class QuantizationConfig(_Strict):
    mode: Literal["none", "nf4", "fp4", "int8"] = Field("nf4", description="bitsandbytes quantization of the frozen base; none for LoRA or full fine-tuning")
    double_quant: bool = Field(True, description="quantize the 4-bit quantization constants too (QLoRA)")


class AdapterConfig(_Strict):
    method: Literal["lora", "ia3", "vera", "loha", "lokr", "oft", "adalora", "full"] = Field("lora", description="peft method, or full to train every weight")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names to adapt, or all-linear")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the peft config of this method")


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="adapter rank (also used by vera, loha, lokr, adalora)")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: learning rate of B = ratio x learning rate of A")


class DataConfig(_Strict):
    train: list[str] = Field(default_factory=list, description="training files or HF dataset folders (json, jsonl, parquet, csv)")
    eval: list[str] = Field(default_factory=list, description="held-out files; if empty, eval_rows are held out from train")
    eval_rows: int = Field(0, ge=0, description="rows held out from train for evaluation when no eval file is given")
    format: Literal["auto", "messages", "prompt_completion", "alpaca"] = Field("auto", description="row format; auto detects it from the keys of the first row")
    system_prompt: str | None = Field(None, description="system message added to rows that have none")
    max_length: int = Field(1024, gt=8, description="tokens per example; longer rows are truncated, or dropped when nothing trainable is left")
    max_rows: int | None = Field(None, gt=0, description="use at most this many training rows (after shuffling)")
    max_eval_rows: int | None = Field(None, gt=0, description="use at most this many held-out rows")
    packing: bool = Field(False, description="pack several examples into one row of max_length tokens (no attention across examples)")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="error: stop before training, naming file, row and field; skip: drop and count")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainConfig(_Strict):
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, gt=0, description="examples per device per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step; the loss is normalised by the tokens of the whole step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="learning-rate schedule")
    optim: str = Field("adamw_torch", description="transformers optimizer name: adamw_torch, adamw_torch_fused, paged_adamw_8bit, sgd, ...")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 disables)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, about 30% slower")
    logging_steps: int = Field(1, gt=0, description="log metrics every N optimizer steps")
    save_steps: int = Field(100, gt=0, description="write a resumable checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=2, description="checkpoints kept on disk (at least 2: the newest may be mid-save when killed)")
    eval_steps: int | None = Field(None, gt=0, description="evaluate on the held-out rows every N steps (always before the first step and after the last)")


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
    project: str = Field("align", description="wandb project")


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
                raise ValueError(f"{key}={value!r} has no effect in a {self.kind} stage ({why}); remove it for this stage")
        return self


class SFTConfig(StageConfig):
    """Supervised fine-tuning with prompt-masked labels."""

    kind: Literal["sft"] = "sft"


class DPOOptions(_Strict):
    loss: Literal["sigmoid", "cdpo", "robust", "ipo", "simpo"] = Field("sigmoid", description="sigmoid (DPO), cdpo (label smoothing), robust, ipo, simpo (reference-free)")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (SimPO: reward scale)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate for cdpo and robust")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin")
    rpo_alpha: float | None = Field(None, ge=0, description="add alpha x the SFT loss on chosen answers (RPO)")
    reference: Literal["precomputed", "live"] = Field(
        "precomputed", description="precomputed: reference logprobs computed once before training; live: every step (adapter disabled / frozen start adapter)"
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
    UNUSED: ClassVar[dict[str, str]] = {"data.packing": "chosen and rejected answers are scored as separate padded rows, never packed"}
    from_stage: str | None = Field(None, alias="from", description="stage whose adapter this one starts from (e.g. sft); none = a fresh adapter")
    dpo: DPOOptions = Field(default_factory=DPOOptions)


class RewardOptions(_Strict):
    margin: bool = Field(False, description="subtract each pair's 'margin' column inside the sigmoid (Llama-2 style)")
    center_coef: float = Field(0.0, ge=0, description="weight of mean((r_c + r_r)^2): keeps scores centred near 0")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate")


class RewardConfig(StageConfig):
    """A Bradley-Terry reward model: the policy's base with an adapter and a scalar head."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    kind: Literal["rm"] = "rm"
    UNUSED: ClassVar[dict[str, str]] = {"data.packing": "each answer is scored at its own last token, so rows are never packed"}
    reward: RewardOptions = Field(default_factory=RewardOptions)


class RolloutConfig(_Strict):
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm when it is installed and can serve the policy, else hf")
    prompts_per_step: int = Field(8, gt=0, description="prompts sampled for each RL step")
    samples_per_prompt: int = Field(1, gt=0, description="completions per prompt (GRPO/RLOO groups need >= 2)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the trainer's logprobs use the same one")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(128, gt=0, description="completion tokens at most; longer ones are cut and count as truncated")
    stop: list[str] = Field(default_factory=list, description="strings that end a completion besides the end-of-turn token")
    batch_size: int = Field(32, gt=0, description="hf engine: sequences per generate call")
    kv_cache_gib: int = Field(2, gt=0, description="vllm on CPU: KV-cache size in GiB")
    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="vllm on GPU: its share of GPU memory, the rest is the trainer's")
    engine_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="vllm: the dtype it serves the policy in; auto = the trainer's on GPU, fp32 on CPU (a bf16 CPU engine rounds every "
        "weight and answered unlike the trainer; bf16 is faster)")
    vllm_sync: Literal["auto", "lora", "merged"] = Field(
        "auto", description="vllm with an adapter policy: lora (a LoRARequest per step), merged (deltas added to the dequantized base, weights pushed); auto: lora on GPU, merged on CPU"
    )


class RLRolloutConfig(RolloutConfig):
    """Rollouts that train a policy (ppo, grpo)."""

    importance_correction: bool | Literal["auto"] = Field(
        "auto", description="truncated importance sampling: each token's policy loss x min(pi_trainer / pi_sampler, importance_cap); "
        "auto = true unless the sampler is the trainer's exact forward (hf in fp32)")
    importance_cap: float = Field(3.0, gt=0, description="upper bound of the importance weight (TRL's default C_max)")


class GRPORolloutConfig(RLRolloutConfig):
    samples_per_prompt: int = Field(4, gt=0, description="completions per prompt: the group each advantage is relative to (>= 2)")


class EvalRolloutConfig(RolloutConfig):
    """Eval's own defaults, which hold whether or not a recipe writes a rollout: section."""

    temperature: float = Field(0.7, gt=0, description="sampling temperature, the same for the policy and every baseline")
    max_new_tokens: int = Field(256, gt=0, description="answer tokens at most")


def _check_reward_spec(value: Any) -> Any:
    """Every rule name, option and key of a reward spec, checked when the recipe is read (so
    `align run --dry-run` catches a misspelt rule before any stage trains)."""
    from reward_models import check_spec  # imports only the rule functions

    check_spec(value)
    return value


class GRPOOptions(_Strict):
    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="grpo: reward minus group mean (/ group std); rloo: minus the mean of the other samples")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std (false = Dr. GRPO)")
    loss_aggregation: Literal["token", "sequence", "constant"] = Field(
        "token", description="token: mean over all completion tokens (DAPO); sequence: per-completion mean, then mean (GRPO paper); constant: sum / (completions x max_new_tokens) (Dr. GRPO)"
    )
    clip: float = Field(0.2, gt=0, description="PPO clip range of the probability ratio")
    epochs: int = Field(1, gt=0, description="passes over each batch of rollouts")
    minibatch_size: int | None = Field(None, gt=0, description="completions per optimizer step; none = the whole batch")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference in the loss (0 = no reference needed)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator in the loss")
    dead_steps: int = Field(5, ge=0, description="stop when for this many steps every completion is truncated and rewards are all equal (0 = never)")


class PPOOptions(_Strict):
    kl_coef: float = Field(0.05, ge=0, description="initial weight of the per-token KL penalty in the reward")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator in the reward penalty")
    target_kl: float | None = Field(None, gt=0, description="adapt kl_coef towards this KL per completion (Ziegler et al.); none = fixed")
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL controller horizon, in completions")
    gamma: float = Field(1.0, gt=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip: float = Field(0.2, gt=0, description="value change clip range")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    value_lr: float | None = Field(None, gt=0, description="learning rate of the value head (none = train.lr)")
    value_head_init: Literal["zero", "reward"] = Field("zero", description="reward: copy the learned reward model's head (same hidden size)")
    epochs: int = Field(4, gt=0, description="PPO epochs over each batch of rollouts")
    minibatch_size: int | None = Field(None, gt=0, description="completions per optimizer step; none = the whole batch")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards of each batch (keeping their mean)")
    normalize_rewards: bool = Field(False, description="scale scores by a running std of all scores seen")
    reward_clip: float | None = Field(None, gt=0, description="clip scores to +-this after normalisation")
    missing_eos_penalty: float | None = Field(None, description="subtract this from the score of completions cut at max_new_tokens")
    early_stop_kl: float | None = Field(None, gt=0, description="stop a step's PPO epochs once the approximate KL to the rollout policy exceeds this")
    dead_steps: int = Field(5, ge=0, description="stop when for this many steps every completion is truncated and rewards are all equal (0 = never)")


class _OnlineRLConfig(StageConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    UNUSED: ClassVar[dict[str, str]] = {
        "data.packing": "rollouts are sampled and scored per completion, never packed",
        "train.grad_accum": "the optimizer step is one minibatch of completions (grpo/ppo.minibatch_size); train.batch_size only splits it into micro-batches",
        "train.optim": "RL stages use torch AdamW (with train.lr and train.weight_decay)",
        "train.eval_steps": "RL stages do not evaluate every N steps (grpo measures the held-out reward before the first step and after the last)",
        "lora.loraplus_lr_ratio": "RL stages use one learning rate for the whole adapter",
    }
    from_stage: str | None = Field(None, alias="from", description="stage whose adapter the policy starts from (e.g. sft); none = a fresh adapter")
    reward: Any = Field(..., description="{type: rule, name: gsm8k_exact} | {type: learned, from: reward} | {type: judge, ...} | a list with weights")
    rollout: RLRolloutConfig = Field(default_factory=RLRolloutConfig)

    @field_validator("reward")
    @classmethod
    def _reward_shape(cls, value: Any) -> Any:
        return _check_reward_spec(value)


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


class EvalConfig(StageConfig):
    """Win-rate of a policy against baselines on held-out prompts (data.eval), judged by rewards."""

    kind: Literal["eval"] = "eval"
    policy: str | None = Field(None, description="stage name (or finished stage folder) to evaluate; none = the last training stage before this one")
    baselines: list[str] = Field(default_factory=lambda: ["base"], description="compared with: stage names, 'base' (the recipe's model, no adapter), or model/stage folders")
    judges: dict[str, Any] = Field(..., description="name -> reward spec ({type: rule|learned|judge, ...}); each judge gets its own win-rate table")
    rollout: EvalRolloutConfig = Field(default_factory=EvalRolloutConfig, description="sampling, identical for the policy and every baseline (fixed seeds)")
    tie_margin: float = Field(0.0, ge=0, description="score differences within this count as ties (learned, rule and pointwise judges)")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the prompts for the 95% interval")
    examples: int = Field(5, ge=0, description="example pairs written to report.md")

    @field_validator("judges")
    @classmethod
    def _judge_specs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("an eval stage needs at least one judge, e.g. judges: {correct: {type: rule, name: gsm8k_exact}}")
        for spec in value.values():
            _check_reward_spec(spec)
        return value

    @model_validator(mode="after")
    def _prompts(self):
        if not self.data.eval:
            raise ValueError("an eval stage reads its held-out prompts from data.eval (data.max_eval_rows caps how many)")
        if self.rollout.samples_per_prompt != 1:
            raise ValueError("eval compares one answer per prompt: rollout.samples_per_prompt must be 1")
        return self


# Stage kinds that exist.
STAGE_SCHEMAS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RewardConfig, "grpo": GRPOConfig, "ppo": PPOConfig, "eval": EvalConfig}
TRAINING_KINDS = ("sft", "dpo", "rm", "grpo", "ppo")
POLICY_KINDS = ("sft", "dpo", "grpo", "ppo")  # stages whose artifact is a policy (a causal LM adapter or model)
# A stage named like this gets that kind unless it says otherwise (`stages: {reward: {...}}` is an rm stage).
KIND_OF_STAGE_NAME = {"reward": "rm", "rloo": "grpo"}
SHARED_SECTIONS = [name for name in StageConfig.model_fields if name != "kind"]


def stage_references(config: StageConfig) -> list[tuple[str, str]]:
    """(key, stage name) for every stage a config names through `from:` (its own, a reward's, a judge's)."""
    specs = []
    reward = getattr(config, "reward", None)
    specs += reward if isinstance(reward, list) else [reward] if isinstance(reward, dict) else []
    for judge in (getattr(config, "judges", None) or {}).values():
        specs += judge if isinstance(judge, list) else [judge]
    found = [("from", config.from_stage)] if getattr(config, "from_stage", None) else []
    return found + [("reward from" if reward else "judge from", s["from"]) for s in specs if isinstance(s, dict) and s.get("from")]


class Recipe(_Strict):
    name: str
    description: str = ""
    path: Path | None = None
    shared: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any]]

    def stage_kind(self, stage: str) -> str:
        return self.stages[stage].get("kind", KIND_OF_STAGE_NAME.get(stage, stage))

    def resolve(self, stage: str, overrides: list[str] | None = None) -> StageConfig:
        """The stage's config: shared sections, then its own section, then ``key=value`` overrides."""
        if stage not in self.stages:
            raise RecipeError(f"{self._where()}: no stage '{stage}' (stages: {', '.join(self.stages) or 'none'})")
        merged = deep_merge(self.shared, self.stages[stage])
        merged.setdefault("kind", KIND_OF_STAGE_NAME.get(stage, stage))
        for override in overrides or []:
            apply_override(merged, override)
        kind = merged["kind"]
        schema = STAGE_SCHEMAS.get(kind)
        if schema is None:
            raise RecipeError(
                f"{self._where()}: stage '{stage}' has kind '{kind}', which this version of align does not "
                f"implement yet (available: {', '.join(STAGE_SCHEMAS)})"
            )
        config = validate(schema, merged, where=f"{self._where()}, stage '{stage}'")
        earlier = list(self.stages)[: list(self.stages).index(stage)]
        for key, source in stage_references(config):
            if source not in earlier:
                raise RecipeError(f"{self._where()}, stage '{stage}': {key}: {source} names no earlier stage (earlier: {', '.join(earlier) or 'none'})")
            wanted = POLICY_KINDS if key == "from" else ("rm",)
            if self.stage_kind(source) not in wanted:
                what = "a policy to start from" if key == "from" else "a learned reward (a reward model)"
                raise RecipeError(f"{self._where()}, stage '{stage}': {key}: {source} is a {self.stage_kind(source)} stage, but {what} "
                                  f"must come from a stage of kind {' or '.join(wanted)}")
        if isinstance(config, EvalConfig):
            trained = [s for s in earlier if self.stage_kind(s) in TRAINING_KINDS and self.stage_kind(s) != "rm"]
            for key, name in [("policy", config.policy)] + [("baselines", b) for b in config.baselines]:
                if name is not None and name in self.stages and name not in earlier:
                    raise RecipeError(f"{self._where()}, stage '{stage}': {key}: {name} is not an earlier stage")
                if name in earlier and self.stage_kind(name) not in POLICY_KINDS:
                    raise RecipeError(f"{self._where()}, stage '{stage}': {key}: {name} is a {self.stage_kind(name)} stage, "
                                      f"not a policy that answers (kinds {', '.join(POLICY_KINDS)})")
            if config.policy is None:
                if not trained:
                    raise RecipeError(f"{self._where()}, stage '{stage}': no policy to evaluate (set policy: <stage or folder>)")
                config.policy = trained[-1]
        return config

    def dependencies(self, stage: str) -> list[str]:
        """The earlier stages whose artifacts this stage reads (from, reward from, eval's policy and baselines)."""
        config = self.resolve(stage)
        names = [source for _, source in stage_references(config)]
        if isinstance(config, EvalConfig):
            names += [n for n in [config.policy, *config.baselines] if n in self.stages]
        return list(dict.fromkeys(names))

    def validate_all(self) -> dict[str, StageConfig]:
        return {stage: self.resolve(stage) for stage in self.stages}

    def _where(self) -> str:
        return str(self.path) if self.path else f"recipe '{self.name}'"


def recipe_files(folder: str | Path = "recipes") -> list[Path]:
    """The recipes under a folder; recipes/accelerate/ holds accelerate launch configs, not recipes."""
    return sorted(p for p in Path(folder).rglob("*.yaml") if "accelerate" not in p.relative_to(folder).parts)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return recipe_from_dict(raw, path=path)


def recipe_from_dict(raw: dict[str, Any], path: Path | None = None) -> Recipe:
    raw = dict(raw)
    where = str(path) if path else "recipe"
    name = raw.pop("name", path.stem if path else "recipe")
    description = raw.pop("description", "")
    stages = raw.pop("stages", None)
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{where}: a recipe needs a non-empty 'stages:' mapping (e.g. stages: {{sft: {{}}}})")
    for key in raw:
        if key not in SHARED_SECTIONS:
            raise RecipeError(f"{where}: unknown key '{key}'{_suggest(key, _known_keys(StageConfig) + ['name', 'description', 'stages'])}")
    for what, value in [("name", name)] + [("stage name", stage) for stage in stages]:
        if not isinstance(value, str) or not NAME_PATTERN.match(value) or ".." in value:
            raise RecipeError(f"{where}: {what} {value!r} is not a plain name - use letters, digits, '-', '_' and '.', "
                              "no '/' and no '..' (it becomes a folder under runs/)")
    stages = {stage: (section or {}) for stage, section in stages.items()}
    recipe = Recipe(name=str(name), description=str(description), path=path, shared=raw, stages=stages)
    recipe.validate_all()
    return recipe


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` over ``base``, recursively. Shares nothing with either, so overrides
    applied to the result never leak into the recipe (a second resolve would see them)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(config: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as YAML (so 1e-4, true, [q_proj] get their types)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{override}' is not of the form key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    # yaml reads "1e-4" as a string (YAML 1.1); numbers like that are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    parts = key.strip().split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = value


def validate(schema: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        known = _known_keys(schema)
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'{_suggest(key, known)}")
            else:
                lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise RecipeError(f"{where}: " + "; ".join(lines)) from None


def _known_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        keys.append(prefix + (field.alias or name))
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


# Names users bring from transformers, TRL, peft and axolotl -> align's name for the same setting.
KEY_ALIASES = {
    "learning_rate": "lr", "lora_alpha": "alpha", "lora_r": "r", "rank": "r", "lora_dropout": "dropout",
    "epoch": "epochs", "num_epochs": "epochs", "num_train_epochs": "epochs", "batch": "batch_size",
    "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum", "warmup": "warmup_ratio",
    "max_seq_length": "max_length", "sequence_len": "max_length", "seq_len": "max_length", "steps": "max_steps",
    "optimizer": "optim", "scheduler": "lr_scheduler", "lr_scheduler_type": "lr_scheduler", "max_grad_norm_clip": "max_grad_norm",
}


def _suggest(key: str, known: list[str]) -> str:
    section, _, leaf = key.rpartition(".")
    if leaf in KEY_ALIASES:  # a known alias beats spelling similarity ('learning_rate' is not 'logging_steps')
        target = KEY_ALIASES[leaf]
        same_section = [k for k in known if k == (f"{section}.{target}" if section else target)]
        anywhere = [k for k in known if k.rpartition(".")[2] == target]
        if same_section or anywhere:
            return f" - did you mean '{(same_section or anywhere)[0]}'?"
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not matches:
        # 'alpha' or 'lora_alpha' written at the wrong level: match on the last part.
        leaf = key.split(".")[-1].replace("_", "")
        by_leaf = [k for k in known if k.split(".")[-1].replace("_", "") in (leaf, leaf.removeprefix("lora"))]
        matches = by_leaf[:1]
    return f" - did you mean '{matches[0]}'?" if matches else ""


def describe_fields(schema: type[BaseModel] = SFTConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field; used by `align recipes keys`."""
    rows = []
    for name, field in schema.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(describe_fields(sub, prefix + name + "."))
        else:
            default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
            rows.append((prefix + (field.alias or name), field.description or "", default))
    return rows


def stage_only_fields() -> dict[str, list[tuple[str, str, Any]]]:
    """Per stage kind, the keys it has beyond the shared sections (dpo.*, reward.*, rollout.*, ...)."""
    shared = {key for key, _, _ in describe_fields(StageConfig)}
    return {kind: [row for row in describe_fields(schema) if row[0] not in shared] for kind, schema in STAGE_SCHEMAS.items()}


def dump_config(config: StageConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
