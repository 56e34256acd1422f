"""The before/after checkup of policy stages and the collapse alarm, on tiny models.

``yes_no_model`` (conftest) answers "Pick one." with yes or no; the checkup's reward is "contains
yes". A run with a sane learning rate reports and completes; one with a huge learning rate is
stopped by the alarm (RL: KL per step; DPO: the chosen answers' likelihood), its folder marked
collapsed, never complete - so `align run` will not build on it.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_jsonl

from align.recipe import load_recipe
from align.stages.checkup import CollapseAlarm

YES = {"type": "rule", "name": "contains_marker", "marker": "yes"}


def test_health_pair_and_task_doctests():
    import align.data.builtin
    import align.eval.health
    import align.stages.sample

    for module in (align.eval.health, align.stages.sample, align.data.builtin):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module


def test_arithmetic_held_out_questions_share_no_first_operand_with_training():
    import re

    from align.data.builtin import arithmetic_rows
    from reward_models.rules import gsm8k_exact

    train, held_out = arithmetic_rows()
    first = lambda rows: {int(re.search(r"What is (\d+) \*", r["prompt"]).group(1)) for r in rows}  # noqa: E731
    assert first(train).isdisjoint(first(held_out)) and len(first(held_out)) == 16
    assert len({r["prompt"] for r in train + held_out}) == 720
    # every worked answer is right by the verifier the recipes judge with
    rows = train + held_out
    assert gsm8k_exact(None, [r["completion"] for r in rows], [r["completion"] for r in rows]) == [1.0] * 720
    assert arithmetic_rows() == (train, held_out)  # seeded: the same files on every machine


def recipe_with_checkup(tmp_path, model_dir, stages: dict, **checkup):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 32)
    return load_recipe(
        tiny_recipe(
            tmp_path / "recipe.yaml",
            model_dir,
            str(prompts),
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            checkup={"prompts": str(prompts), "max_prompts": 4, "reward": YES, "max_new_tokens": 4, **checkup},
            stages=stages,
        )
    )


GRPO = {
    "kind": "grpo",
    "reward": YES,
    "rollout": {"engine": "hf", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 2},
    "grpo": {"kl_coef": 0.05},
}


def test_grpo_reports_its_checkup_and_completes(tmp_path, yes_no_model):
    from align.stages.grpo import run_grpo

    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}}
    )
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    checkup = manifest["checkup"]
    assert manifest["status"] == "complete" and checkup["collapse"] == []
    assert checkup["prompts"] == 4 and checkup["start"] == "base (adapter off)"
    for side in ("before", "after"):
        assert set(checkup[side]) == {"reward", "loop_fraction", "distinct_2", "length_mean", "truncated_fraction"}
    # the policy learned to say yes, so it moved away from its start: a positive KL, a reward that did not fall
    assert 0 < checkup["kl_per_token"] < 1.0
    assert checkup["after"]["reward"] >= checkup["before"]["reward"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loop_fraction" in r and "distinct_2" in r for r in records)


def test_sft_raises_held_out_exact_match_from_zero(tmp_path, tiny_llama):
    """SFT's checkup on prompts it never trained on: the random tiny model never answers "yes"
    (reward 0); taught to answer "yes" to 24 questions, it answers the 4 held-out ones with it
    (reward 1). With the update disabled the after side equals the before side, so this fails."""
    from align.stages.sft import run_sft

    rows = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"Is {i} a number?", "completion": "yes"} for i in range(24)]
    )
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": f"Is {i} a number?"} for i in range(90, 94)])
    recipe = load_recipe(
        tiny_recipe(
            tmp_path / "recipe.yaml",
            tiny_llama,
            str(rows),
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            checkup={"prompts": str(held_out), "max_prompts": 4, "max_new_tokens": 4, "reward": YES},
            stages={"sft": {"train": {"max_steps": 30, "lr": 2e-2, "batch_size": 8}}},
        )
    )
    out = run_sft(recipe.resolve("sft"), tmp_path / "sft", recipe_name="tiny")
    checkup = json.loads((out / "manifest.json").read_text())["checkup"]
    assert checkup["before"]["reward"] == 0.0 and checkup["after"]["reward"] == 1.0, checkup
    assert checkup["collapse"] == []  # SFT has no KL alarm: moving far from the start is its job


def test_grpo_raises_the_checkup_reward_from_zero(tmp_path, yes_no_model):
    """The start's greedy answer is "yes" (it samples no about half the time): rewarded for "no", GRPO
    turns the greedy answer around, so the checkup's verifier goes 0 -> 1. With the update disabled
    the greedy answer stays "yes" and this fails."""
    from align.stages.grpo import run_grpo

    no = {"type": "rule", "name": "contains_marker", "marker": "no"}
    grpo = {**GRPO, "reward": no, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"grpo": grpo}, reward=no)
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    checkup = json.loads((out / "manifest.json").read_text())["checkup"]
    assert checkup["before"]["reward"] == 0.0 and checkup["after"]["reward"] == 1.0, checkup
    assert checkup["collapse"] == []


def test_collapse_alarm_stops_rl_with_a_huge_learning_rate(tmp_path, yes_no_model):
    from align.stages.grpo import run_grpo

    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 10, "lr": 1.0, "batch_size": 16}}}
    )
    with pytest.raises(CollapseAlarm, match="KL"):
        run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["status"] == "collapsed" and manifest["stopped_early"].startswith("collapse: KL")
    assert manifest["steps"] < 10  # stopped during training, not after it
    # the same run with the alarm off reports the collapse and completes
    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 3, "lr": 1.0, "batch_size": 16}}}, alarm=False
    )
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo-off", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["checkup"]["collapse"]


def test_collapse_alarm_stops_dpo_when_the_chosen_answers_fall(tmp_path, yes_no_model):
    from align.stages.dpo import run_dpo

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Pick one.", "chosen": "yes", "rejected": "no"}] * 32)
    stage = {
        "kind": "dpo",
        "data": {"train": str(pairs)},
        "dpo": {"beta": 0.1},
        "train": {"max_steps": 20, "lr": 1.0, "batch_size": 4},
    }
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"dpo": stage})
    with pytest.raises(CollapseAlarm, match="chosen answers. log-probability fell"):
        run_dpo(recipe.resolve("dpo"), tmp_path / "dpo", recipe_name="tiny")
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["status"] == "collapsed" and manifest["steps"] < 20
    # a sane learning rate: no alarm, and the chosen answer gained
    stage["train"] = {"max_steps": 6, "lr": 1e-3, "batch_size": 4}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"dpo": stage})
    out = run_dpo(recipe.resolve("dpo"), tmp_path / "dpo-sane", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["checkup"]["collapse"] == []
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["chosen_logratio_per_token"] > 0  # lr 1e-2 already overshoots on this tiny model (CI, 2026-12-02)


def test_a_collapsed_stage_is_not_an_input(tmp_path, yes_no_model, monkeypatch):
    """align run stops at the collapsed stage; the next run re-makes it rather than building on it."""
    from align.pipeline import Pipeline

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    grpo = {**GRPO, "train": {"max_steps": 10, "lr": 1.0, "batch_size": 16}}
    later = {**GRPO, "from": "grpo", "train": {"max_steps": 1, "lr": 1e-3, "batch_size": 16}}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"grpo": grpo, "more": later})
    pipeline = Pipeline(recipe)
    with pytest.raises(CollapseAlarm):
        pipeline.run(pipeline.plan())
    assert not (tmp_path / "runs" / "tiny" / "more").exists()
    plans = Pipeline(recipe).plan()
    assert [p.action for p in plans] == ["run", "run"] and "collapse alarm stopped it" in plans[0].reason


def _watch_on_two_processes(rank: int, init_file: str, results: str) -> None:
    """One of two gloo processes: this process's own DPO stats cross the alarm threshold only on rank 0."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from align.config import CheckupConfig
    from align.stages.preference import ChosenWatch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        watch, control, state = ChosenWatch(CheckupConfig(max_chosen_drop=0.5)), TrainerControl(), TrainerState()
        state.global_step = 7
        watch.on_log(None, state, control, logs={"loss": 0.6, "chosen_logratio_per_token": -0.1})  # both fine
        stopped_early = control.should_training_stop
        watch.on_log(None, state, control, logs={"chosen_logratio_per_token": -0.9 if rank == 0 else -0.1})
        Path(f"{results}.{rank}").write_text(json.dumps([stopped_early, control.should_training_stop, watch.reason]))
    finally:
        dist.destroy_process_group()


def test_dpo_alarm_stops_every_process_when_one_crosses_it(tmp_path):
    """Under DDP each process sees its own batches' chosen log-ratio: when one crosses the alarm, every
    process stops at that step (one going on alone would wait in the next gradient all-reduce for ever)."""
    import torch.multiprocessing as mp

    results = str(tmp_path / "result")
    mp.spawn(_watch_on_two_processes, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    first, second = (json.loads(Path(f"{results}.{rank}").read_text()) for rank in (0, 1))
    assert (first[1], second[1]) == (True, True)  # before: only the process that crossed it stopped
    assert (first[0], second[0]) == (False, False)
    assert "fell 0.900 per token" in first[2] and "another process" in second[2]
