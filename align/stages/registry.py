"""Every stage kind in one place: its schema, what runs it, what plans it, what it makes.

The CLI's stage commands, `align run`'s plan and runner, and the recipe's `from:` checks all read
this table; nothing else branches on a stage kind. A new method is one stage file (a ``run_*``
function and a ``plan`` function beside it) plus one entry here.

Runners and planners are named as "module:function" and imported only when used: reading a
recipe (or `align --help`) must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Literal

from align.config import (
    DPOConfig,
    EvalConfig,
    GRPOConfig,
    KTOConfig,
    ORPOConfig,
    PPOConfig,
    RewardConfig,
    SampleConfig,
    SFTConfig,
    StageConfig,
)

# What a finished stage folder holds, which decides where it may be used:
#   policy  a causal LM (adapter or whole model): `from:`, eval's policy and baselines
#   reward  a scalar reward model: `reward: {type: learned, from: ...}`, eval judges, PPO's value head
#   pairs   preference pairs (pairs.jsonl, eval_pairs.jsonl): `data: {from: ...}` of dpo and rm stages
#   report  an evaluation report; nothing reads it as an input
Output = Literal["policy", "reward", "pairs", "report"]


@dataclass(frozen=True)
class StageKind:
    kind: str
    schema: type[StageConfig]
    runs: str  # "module:function" (cfg, output_dir, recipe_name=, overwrite=, resume=, provenance=[, from_dir=])
    plans: str  # "module:function" (cfg, tokenizer) -> (rows, work): reads every row, so it is the validation
    output: Output
    summary: str  # the stage command's help
    starts_from: bool = False  # takes `from:` / --from-dir (a policy to start from)
    stage_names: tuple[
        str, ...
    ] = ()  # stages named so get this kind unless they say otherwise; the first is the command's default stage

    @property
    def runner(self) -> Callable:
        return _load(self.runs)

    @property
    def planner(self) -> Callable:
        return _load(self.plans)


def _load(reference: str) -> Callable:
    module, _, name = reference.partition(":")
    return getattr(import_module(module), name)


REGISTRY: dict[str, StageKind] = {
    entry.kind: entry
    for entry in (
        StageKind(
            "sft",
            SFTConfig,
            "align.stages.sft:run_sft",
            "align.stages.sft:plan",
            "policy",
            "Supervised fine-tuning with prompt-masked labels (QLoRA by default).",
        ),
        StageKind(
            "rm",
            RewardConfig,
            "align.stages.reward:run_reward",
            "align.stages.reward:plan",
            "reward",
            "Train a Bradley-Terry reward model on prompt/chosen/rejected pairs.",
            starts_from=True,
            stage_names=("reward",),
        ),
        StageKind(
            "dpo",
            DPOConfig,
            "align.stages.dpo:run_dpo",
            "align.stages.dpo:plan",
            "policy",
            "Preference optimisation (DPO, cDPO, robust, IPO, SimPO) on prompt/chosen/rejected pairs.",
            starts_from=True,
        ),
        StageKind(
            "orpo",
            ORPOConfig,
            "align.stages.dpo:run_dpo",
            "align.stages.dpo:plan",
            "policy",
            "ORPO on prompt/chosen/rejected pairs: SFT and preference in one stage, no reference model.",
            starts_from=True,
        ),
        StageKind(
            "kto",
            KTOConfig,
            "align.stages.kto:run_kto",
            "align.stages.kto:plan",
            "policy",
            "KTO on unpaired answers labelled desirable or not (prompt/completion/label; pairs count as two).",
            starts_from=True,
        ),
        StageKind(
            "grpo",
            GRPOConfig,
            "align.stages.grpo:run_grpo",
            "align.stages.rl_setup:plan",
            "policy",
            "Online RL with group-relative advantages: GRPO or RLOO (grpo.algorithm), rollouts from hf or vLLM.",
            starts_from=True,
            stage_names=("grpo", "rloo"),
        ),
        StageKind(
            "ppo",
            PPOConfig,
            "align.stages.ppo:run_ppo",
            "align.stages.rl_setup:plan",
            "policy",
            "Online RL with PPO: value head, per-token KL penalty, GAE, clipped policy and value losses.",
            starts_from=True,
        ),
        StageKind(
            "sample",
            SampleConfig,
            "align.stages.sample:run_sample",
            "align.stages.sample:plan",
            "pairs",
            "Preference pairs from a policy's own answers: n samples per prompt ranked by a reward, best vs worst.",
            starts_from=True,
        ),
        StageKind(
            "eval",
            EvalConfig,
            "align.stages.evaluate:run_eval",
            "align.stages.evaluate:plan",
            "report",
            "Win-rate of a policy against baselines on held-out prompts.",
        ),
    )
}


def kinds_making(output: Output) -> tuple[str, ...]:
    """The stage kinds whose folder holds this kind of artifact."""
    return tuple(kind for kind, entry in REGISTRY.items() if entry.output == output)


def default_kind(stage_name: str) -> str:
    """The kind of a stage that does not say: `stages: {reward: {...}}` is an rm stage, `sft` an sft stage."""
    for entry in REGISTRY.values():
        if stage_name in entry.stage_names:
            return entry.kind
    return stage_name


POLICY_KINDS = kinds_making("policy")
