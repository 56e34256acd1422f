"""The sections every stage kind shares (model, quantization, adapter, lora, data, train, tracking,
checkup) and the rollout sections of the kinds that sample."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from align.config.base import _Strict
from align.config.rewards import RewardSpecs, parse_reward, reward_parts


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
