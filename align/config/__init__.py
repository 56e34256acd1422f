"""The recipe schemas: one pydantic model per stage kind, and the sections they share.

  base      strict models (an unknown key is an error), RecipeError, did_you_mean
  rewards   the typed reward specs (rule, learned, judge, remote, openai, python) and parse_reward
  sections  the shared sections (model, quantization, adapter, lora, data, train, tracking, checkup)
            and the rollout sections
  stages    StageConfig and the offline kinds (sft, dpo, orpo, kto, rm, sample, eval); helpers that
            read any stage's config (stage_references, dump_config, schema_of)
  rl        the online RL kinds (grpo, ppo), their options and monitors

The package imports nothing from align outside it (rewards reads reward_models/rules.py to check rule
names), so every layer may use it; tests/test_layers.py walks the imports. Loading YAML, overrides and
the stage graph are in align/recipe.py; which kinds exist, and what each one runs, is in
align/stages/registry.py. Import names from here (align.config), not from the modules.
"""

from align.config.base import RecipeError, _Strict, did_you_mean
from align.config.rewards import (
    REWARD_SPECS,
    JudgeSpec,
    LearnedSpec,
    OpenAIJudgeSpec,
    PythonSpec,
    RemoteSpec,
    RewardSpec,
    RewardSpecs,
    RuleSpec,
    has_pairwise,
    parse_reward,
    reward_parts,
)
from align.config.rl import GRPOConfig, GRPOOptions, MonitorConfig, PPOConfig, PPOOptions, PtxConfig
from align.config.sections import (
    AdapterConfig,
    CheckupConfig,
    DataConfig,
    EvalRolloutConfig,
    GRPORolloutConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    RLRolloutConfig,
    RolloutConfig,
    TrackingConfig,
    TrainConfig,
)
from align.config.stages import (
    SHARED_SECTIONS,
    BestOfBaseline,
    DPOConfig,
    DPOOptions,
    EvalConfig,
    KTOConfig,
    KTOOptions,
    ORPOConfig,
    ORPOOptions,
    RewardConfig,
    RewardOptions,
    SampleConfig,
    SampleRolloutConfig,
    SFTConfig,
    StageConfig,
    dump_config,
    reward_specs,
    schema_of,
    stage_references,
)

__all__ = [
    "REWARD_SPECS",
    "SHARED_SECTIONS",
    "AdapterConfig",
    "BestOfBaseline",
    "CheckupConfig",
    "DPOConfig",
    "DPOOptions",
    "DataConfig",
    "EvalConfig",
    "EvalRolloutConfig",
    "GRPOConfig",
    "GRPOOptions",
    "GRPORolloutConfig",
    "JudgeSpec",
    "KTOConfig",
    "KTOOptions",
    "LearnedSpec",
    "LoraConfig",
    "ModelConfig",
    "MonitorConfig",
    "ORPOConfig",
    "ORPOOptions",
    "OpenAIJudgeSpec",
    "PythonSpec",
    "PPOConfig",
    "PPOOptions",
    "PtxConfig",
    "QuantizationConfig",
    "RLRolloutConfig",
    "RecipeError",
    "RemoteSpec",
    "RewardConfig",
    "RewardOptions",
    "RewardSpec",
    "RewardSpecs",
    "RolloutConfig",
    "RuleSpec",
    "SFTConfig",
    "SampleConfig",
    "SampleRolloutConfig",
    "StageConfig",
    "TrackingConfig",
    "TrainConfig",
    "_Strict",
    "did_you_mean",
    "dump_config",
    "has_pairwise",
    "parse_reward",
    "reward_parts",
    "reward_specs",
    "schema_of",
    "stage_references",
]
