"""Recipe schema: merging, overrides, unknown keys with suggestions, safe YAML, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import RecipeError
from align.recipe import load_recipe, recipe_files, recipe_from_dict
from align.stages.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def test_stage_sections_override_shared_and_cli_overrides_win():
    recipe = recipe_from_dict(
        {
            "name": "r",
            "lora": {"r": 8},
            "train": {"lr": 1e-3},
            "stages": {"sft": {"train": {"max_steps": 5}}},
        }
    )
    cfg = recipe.resolve(
        "sft", ["lora.r=32", "train.lr=1e-4", "data.train=a.jsonl", "adapter.target_modules=[q_proj, v_proj]"]
    )
    assert cfg.lora.r == 32 and cfg.train.lr == 1e-4 and cfg.train.max_steps == 5
    assert cfg.data.train == ["a.jsonl"] and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 32  # untouched default
    assert recipe.resolve("sft").lora.r == 8  # overrides do not leak into the recipe


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"lora": {"alhpa": 4}}, "unknown key 'lora.alhpa' - did you mean 'lora.alpha'?"),
        ({"lora_alpha": 4}, "did you mean 'lora.alpha'?"),
        ({"train": {"learning_rate": 1}}, "unknown key 'train.learning_rate'"),
    ],
)
def test_unknown_keys_fail_with_a_suggestion(raw, expected):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"name": "r", **raw, "stages": {"sft": {}}})
    assert expected in str(err.value)


def test_bad_override_and_bad_value_are_named():
    recipe = recipe_from_dict({"name": "r", "stages": {"sft": {}}})
    with pytest.raises(RecipeError, match="lora.rr.*did you mean 'lora.r'"):
        recipe.resolve("sft", ["lora.rr=3"])
    with pytest.raises(RecipeError, match="train.lr"):
        recipe.resolve("sft", ["train.lr=-1"])
    with pytest.raises(RecipeError, match="key=value"):
        recipe.resolve("sft", ["lora.r"])


def test_unknown_stage_kind_is_a_clear_error():
    with pytest.raises(RecipeError, match="kind 'simpo-online'"):
        recipe_from_dict({"name": "r", "stages": {"simpo-online": {}}})


def test_eval_stage_defaults_to_the_last_policy_and_checks_its_names():
    judges = {"rm": {"type": "learned", "from": "reward"}}
    stages = {"sft": {}, "reward": {}, "dpo": {"from": "sft"}, "eval": {"judges": judges, "data": {"eval": "p.jsonl"}}}
    recipe = recipe_from_dict({"name": "r", "stages": stages})
    assert recipe.resolve("eval").policy == "dpo"  # the last training stage that is not a reward model
    assert recipe.dependencies("eval") == ["reward", "dpo"]
    with pytest.raises(RecipeError, match="judge from: critic names no earlier stage"):
        recipe_from_dict(
            {
                "name": "r",
                "stages": {
                    **stages,
                    "eval": {"judges": {"x": {"type": "learned", "from": "critic"}}, "data": {"eval": "p"}},
                },
            }
        )
    with pytest.raises(RecipeError, match="data.eval"):
        recipe_from_dict({"name": "r", "stages": {**stages, "eval": {"judges": judges}}})
    with pytest.raises(RecipeError, match="at least one judge"):
        recipe_from_dict({"name": "r", "stages": {**stages, "eval": {"judges": {}, "data": {"eval": "p"}}}})


def test_from_must_name_an_earlier_stage():
    with pytest.raises(RecipeError, match="from: sft names no earlier stage"):
        recipe_from_dict({"name": "r", "stages": {"dpo": {"from": "sft"}, "sft": {}}})
    recipe = recipe_from_dict({"name": "r", "stages": {"sft": {}, "dpo": {"from": "sft", "dpo": {"beta": 0.2}}}})
    assert recipe.resolve("dpo").from_stage == "sft" and recipe.resolve("dpo").dpo.beta == 0.2
    with pytest.raises(RecipeError, match="label_smoothing"):
        recipe.resolve("dpo", ["dpo.loss=cdpo"])


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: {{sft: {{}}}}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default():
    cfg = recipe_from_dict({"name": "r", "stages": {"sft": {}}}).resolve("sft")
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("path", recipe_files(ROOT / "recipes"), ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    order = list(recipe.stages)
    for stage, cfg in recipe.validate_all().items():
        assert cfg.kind in REGISTRY
        assert cfg.data.eval if cfg.kind == "eval" else cfg.data.train, f"{path}: stage {stage} has no data"
        assert all(order.index(dep) < order.index(stage) for dep in recipe.dependencies(stage))
    assert recipe.description, f"{path}: the README's recipe list needs a description"


def test_overrides_do_not_leak_into_the_next_resolve(tmp_path):
    """A stage-only section (no shared copy) must not be mutated by one resolve's overrides."""
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nstages:\n  sft:\n    train: {lr: 0.001}\n", encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.resolve("sft", ["train.lr=0.5"]).train.lr == 0.5
    assert recipe.resolve("sft").train.lr == 0.001


def test_every_key_of_every_stage_is_described():
    """`align recipes keys` lists the shared keys and each kind's own; each has a description (STYLE 5)."""
    from typer.testing import CliRunner

    from align.cli import app
    from align.config import StageConfig
    from align.recipe import describe_fields, stage_only_fields

    own = stage_only_fields()
    assert {"dpo.beta", "from"} <= {k for k, _, _ in own["dpo"]}
    assert {"grpo.algorithm", "rollout.samples_per_prompt", "reward"} <= {k for k, _, _ in own["grpo"]}
    assert {"ppo.gamma", "ppo.value_head_init", "rollout.engine"} <= {k for k, _, _ in own["ppo"]}
    assert {"kto.desirable_weight", "orpo.sft_on_prompt"} <= {k for k, _, _ in own["kto"] + own["orpo"]}
    rows = describe_fields(StageConfig) + [row for kind_rows in own.values() for row in kind_rows]
    from align.config import REWARD_SPECS  # rewards and judges: listed by type

    rows += [row for spec in REWARD_SPECS.values() for row in describe_fields(spec) if row[0] != "type"]
    shown = " ".join(CliRunner().invoke(app, ["recipes", "keys"], terminal_width=200).output.split())
    assert "a reward or judge of type remote" in shown and "max_requests = None" in shown
    assert all(description for key, description, _ in rows if key != "kind"), [
        k for k, d, _ in rows if not d and k != "kind"
    ]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_accelerate_configs_parse_with_accelerate(name):
    """recipes/accelerate/*.yaml are read by accelerate's own parser, which rejects unknown keys."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected and config.mixed_precision == "bf16"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_registry_entries_resolve_and_drive_the_cli():
    """Every kind's runner and planner import and are callables; its schema says the same kind; the
    CLI has a command per kind (the trainers' made from the entry, with --from-dir exactly where
    the kind starts from a policy)."""
    import inspect

    from typer.testing import CliRunner

    from align.cli import app
    from align.stages.registry import POLICY_KINDS, REGISTRY, default_kind

    for kind, entry in REGISTRY.items():
        assert callable(entry.runner) and callable(entry.planner), kind
        assert entry.schema.model_fields["kind"].default == kind
        assert {"recipe_name", "overwrite", "resume", "provenance"} <= set(
            inspect.signature(entry.runner).parameters
        ), kind
        assert ("from_dir" in inspect.signature(entry.runner).parameters) == entry.starts_from, kind
        command = ["rm", "train"] if kind == "rm" else [kind]
        shown = CliRunner().invoke(app, [*command, "--help"], terminal_width=200).output
        assert "--recipe" in shown, kind
        assert ("--from-dir" in shown) == entry.starts_from, kind
    assert POLICY_KINDS == ("sft", "dpo", "orpo", "kto", "grpo", "ppo")
    assert default_kind("reward") == "rm" and default_kind("rloo") == "grpo" and default_kind("sft") == "sft"


def test_reward_specs_doctests():
    """reward_specs (what align run fingerprints a Python reward's file from) skips an rm stage's options."""
    import doctest

    import align.config.stages

    result = doctest.testmod(align.config.stages)
    assert result.attempted > 0 and result.failed == 0
