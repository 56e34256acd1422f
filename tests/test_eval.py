"""`align eval`: the win-rate maths by hand, then the real CLI on tiny models (policy vs base,
judged by a rule and by a tiny pairwise LLM judge), reproducibility, and clear early errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ShiftedSampler, write_jsonl

from align.eval.winrate import (
    bootstrap_interval,
    counts,
    fit_length_model,
    length_controlled_win_rate,
    length_feature,
    outcomes_from_probabilities,
    outcomes_from_scores,
    win_rate,
)

# -- maths ---------------------------------------------------------------------------------------


def test_outcomes_from_scores_count_ties_within_the_margin():
    policy, baseline = [1.0, 0.5, 0.30, 0.0, 0.7], [0.5, 0.5, 0.35, 0.2, 0.65]  # differences 0.5, 0, -0.05, -0.2, 0.05
    assert outcomes_from_scores(policy, baseline).tolist() == [1.0, 0.5, 0.0, 0.0, 1.0]
    assert outcomes_from_scores(policy, baseline, tie_margin=0.1).tolist() == [1.0, 0.5, 0.5, 0.0, 0.5]
    outcomes = outcomes_from_scores(policy, baseline, tie_margin=0.1)
    assert counts(outcomes) == (1, 3, 1)
    assert win_rate(outcomes) == pytest.approx((1 + 3 / 2) / 5)


def test_outcomes_from_pairwise_probabilities():
    assert outcomes_from_probabilities([0.9, 0.5, 0.2, 0.51]).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_prompts():
    few = np.array([1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5] * 3)  # 24 prompts, win-rate 0.625
    many = np.tile(few, 25)  # 600 prompts, the same win-rate
    low, high = bootstrap_interval(few, 2000, seed=0)
    assert low < win_rate(few) < high
    wide = high - low
    low, high = bootstrap_interval(many, 2000, seed=0)
    assert low < win_rate(many) < high
    assert high - low < wide / 3  # the interval shrinks like 1 / sqrt(N): sqrt(25) = 5
    assert bootstrap_interval(few, 500, seed=3) == bootstrap_interval(few, 500, seed=3)
    assert bootstrap_interval([1.0] * 10, 200) == (1.0, 1.0)


def test_length_model_without_length_information_is_the_plain_logit():
    intercept, slope = fit_length_model([1, 1, 1, 0], [0, 0, 0, 0])
    assert intercept == pytest.approx(np.log(3)) and slope == pytest.approx(0)
    # ties are half-labels: 2 wins, 2 ties, 0 losses -> mean 0.75 -> logit ln 3
    intercept, _ = fit_length_model([1, 1, 0.5, 0.5], [0, 0, 0, 0])
    assert intercept == pytest.approx(np.log(3))


def synthetic_lengths(n: int, seed: int, policy_longer: float = 0.8):
    """Baseline answers of 20-200 tokens; the policy's are 1-60 tokens longer (80% of prompts) or shorter."""
    rng = np.random.default_rng(seed)
    baseline = rng.integers(20, 200, n)
    gap = rng.integers(1, 60, n)
    policy = np.where(rng.random(n) < policy_longer, baseline + gap, baseline - gap)
    return policy, baseline, rng


def test_length_controlled_win_rate_removes_a_length_preference():
    # a judge that prefers the longer answer, P(policy wins) = sigmoid(4 tanh(d / std d)): nothing else
    policy, baseline, rng = synthetic_lengths(2000, seed=0)
    p_win = 1 / (1 + np.exp(-4 * length_feature(policy, baseline)))
    outcomes = (rng.random(len(policy)) < p_win).astype(float)
    assert win_rate(outcomes) > 0.7
    assert length_controlled_win_rate(outcomes, policy, baseline) == pytest.approx(0.5, abs=0.06)


def test_length_controlled_win_rate_when_the_longer_answer_always_wins():
    """Raw 0.8; length explains it all. Perfectly separable data have no logistic fit (the slope
    would be infinite); with the L2 on the slope the fit leaves part of the 80/20 split in the
    intercept, so the LC win-rate moves most of the way, not all of it, towards 0.5."""
    policy, baseline, _ = synthetic_lengths(2000, seed=1)
    outcomes = (policy > baseline).astype(float)
    assert win_rate(outcomes) == pytest.approx(0.8, abs=0.02)
    lc = length_controlled_win_rate(outcomes, policy, baseline)
    assert 0.5 < lc < 0.75


def test_length_controlled_win_rate_is_the_raw_one_when_length_does_not_matter():
    policy, baseline, rng = synthetic_lengths(2000, seed=2)
    outcomes = rng.choice([1.0, 0.5, 0.0], size=len(policy), p=[0.55, 0.2, 0.25])
    assert length_controlled_win_rate(outcomes, policy, baseline) == pytest.approx(win_rate(outcomes), abs=0.03)


@pytest.mark.parametrize(
    "outcomes, policy, baseline, expected",
    [
        ([1, 0, 1, 1], [5, 5, 5, 5], [5, 5, 5, 5], 0.75),  # all lengths equal: length explains nothing
        (
            [1, 0, 1, 1],
            [9, 9, 9, 9],
            [5, 5, 5, 5],
            0.75,
        ),  # always 4 longer: no variation to separate from the intercept
        ([1, 1, 1], [7, 1, 6], [3, 5, 2], 1.0),  # all wins
        ([0, 0], [7, 1], [3, 5], 0.0),  # all losses
        ([0.5], [3], [9], 0.5),  # one prompt, a tie
        ([1, 0], [7, 1], [3, 5], 0.5),  # separable by length, symmetric
    ],
)
def test_length_controlled_win_rate_degenerate_inputs_are_finite(outcomes, policy, baseline, expected):
    assert length_controlled_win_rate(outcomes, policy, baseline) == pytest.approx(expected, abs=1e-6)


def test_length_controlled_win_rate_separable_small_sample_is_finite():
    lc = length_controlled_win_rate([1, 1, 1, 0, 0], [9, 8, 30, 2, 1], [3, 5, 2, 6, 9])
    assert 0 < lc < 1 and np.isfinite(lc)


# -- the real CLI on tiny models -----------------------------------------------------------------

YES = "rule:contains_marker,marker=yes"


def align_eval(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "align.cli", "eval", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "prompts.jsonl", [{"prompt": "Pick one."}] * 8)


@pytest.fixture(scope="module")
def standalone_runs(tmp_path_factory, yes_no_model, tiny_llama, prompts):
    """The yes/no SFT stage against its base (the random tiny Llama), judged by 'contains yes' and
    by the tiny Llama as a pairwise judge; run twice into different folders."""
    folder = tmp_path_factory.mktemp("eval")
    stage = yes_no_model.parent  # the finished sft stage folder (full fine-tune: manifest + model/)
    outs = []
    for run in ("first", "second"):
        out = folder / run
        proc = align_eval(
            "--policy",
            str(stage),
            "--prompts",
            str(prompts),
            "--judge",
            YES,
            "--judge",
            f"judge:{tiny_llama}",
            "--engine",
            "hf",
            "--max-new-tokens",
            "4",
            "--temperature",
            "1",
            "--max-prompts",
            "6",
            "--output-dir",
            str(out),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs.append((out, proc))
    return stage, outs


def test_policy_against_base_through_the_cli(standalone_runs, tiny_llama):
    stage, [(out, proc), _] = standalone_runs
    for name in ("report.json", "report.md", "winrate.png", "samples.jsonl", "config.yaml", "manifest.json"):
        assert (out / name).is_file(), name
    assert "hf (transformers generate" in proc.stdout  # the engine used is logged
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"]["n"] == 6 and report["prompts"]["sets"]["held_out"]["rows"]["read"] == 8
    assert report["policy"]["path"] == str(stage.resolve())
    assert [b["name"] for b in report["baselines"]] == ["base"] and report["baselines"][0]["path"] == str(tiny_llama)
    rule, judge = report["results"]
    assert (rule["judge"], rule["baseline"], judge["judge"]) == (YES, "base", f"judge:{tiny_llama}")
    for row in (rule, judge):
        assert row["wins"] + row["ties"] + row["losses"] == row["n"] == 6
        assert row["win_rate"] == pytest.approx((row["wins"] + row["ties"] / 2) / 6)
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
        assert 0 <= row["lc_win_rate"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    # the trained policy says yes or no; the random base says neither, so "yes" is a win, "no" a tie
    assert {s["policy"] for s in samples} <= {"yes", "no"}
    assert all(s["policy"] != s["baselines"]["base"] for s in samples)
    assert rule["wins"] == sum(s["policy"] == "yes" for s in samples) > 0 and rule["losses"] == 0
    assert all(s["judges"][YES]["base"]["outcome"] == (1.0 if s["policy"] == "yes" else 0.5) for s in samples)
    assert rule["policy_length"] == pytest.approx(np.mean([s["lengths"][report["policy"]["name"]] for s in samples]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "eval" and manifest["artifact"] == "report"
    assert manifest["results"] == report["results"]
    markdown = (out / "report.md").read_text()
    assert f"| {YES} | base | {rule['wins']} | {rule['ties']} | 0 |" in markdown
    assert markdown.count("### Prompt") == 5  # examples: 5 (the default) per baseline


def test_named_sets_are_judged_apart_and_the_first_equals_its_file_alone(standalone_runs, tmp_path, prompts):
    """--prompts NAME=FILE twice: one table per set; the first set's numbers are the single-set run's on the
    same file (same prompts, seeds and answers), and the second set's row counts only its own prompts."""
    stage, [(alone, _), _] = standalone_runs
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Pick two."}] * 4)
    out = tmp_path / "sets"
    proc = align_eval(
        *("--policy", str(stage), "--prompts", f"task={prompts}", "--prompts", f"reworded={other}"),
        *("--judge", YES, "--engine", "hf", "--max-new-tokens", "4", "--temperature", "1", "--max-prompts", "6"),
        *("--output-dir", str(out)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {name: info["n"] for name, info in report["prompts"]["sets"].items()} == {"task": 6, "reworded": 4}
    task, reworded = report["results"]
    assert (task["set"], reworded["set"]) == ("task", "reworded") and reworded["n"] == 4
    [single] = [r for r in json.loads((alone / "report.json").read_text())["results"] if r["judge"] == YES]
    assert {**task, "set": None} == {**single, "set": None}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["set"] for s in samples] == ["task"] * 6 + ["reworded"] * 4
    assert reworded["wins"] == sum(s["policy"] == "yes" for s in samples[6:])
    markdown = (out / "report.md").read_text()
    assert "## Set `task` (6 prompts)" in markdown and "## Set `reworded` (4 prompts)" in markdown
    printed = " ".join(proc.stdout.split())  # rich wraps a table's title to the table's width
    assert "prompts of set task" in printed and "prompts of set reworded" in printed  # a console table per set


def test_named_sets_are_for_eval_stages_and_plain_names(tmp_path):
    from align.config import DPOConfig, EvalConfig

    judges = {"yes": {"type": "rule", "name": "contains_marker", "marker": "yes"}}
    cfg = EvalConfig(judges=judges, data={"eval": {"task": "a.jsonl", "reworded": ["b.jsonl", "c.jsonl"]}})
    assert cfg.data.eval == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert cfg.data.held_out_sets() == {"task": ["a.jsonl"], "reworded": ["b.jsonl", "c.jsonl"]}
    again = EvalConfig(**cfg.model_dump(by_alias=True))  # what config.yaml holds reads back the same
    assert again.data.held_out_sets() == cfg.data.held_out_sets()
    assert EvalConfig(judges=judges, data={"eval": "a.jsonl"}).data.held_out_sets() == {"held_out": ["a.jsonl"]}
    with pytest.raises(ValueError, match="read by eval stages"):
        DPOConfig(data={"train": "p.jsonl", "eval": {"task": "a.jsonl"}})
    with pytest.raises(ValueError, match="not a plain set name"):
        EvalConfig(judges=judges, data={"eval": {"a set": "a.jsonl"}})


def test_a_pairwise_llm_judge_reports_its_position_bias(standalone_runs):
    _, [(out, _), _] = standalone_runs
    judge = json.loads((out / "report.json").read_text())["results"][1]
    assert isinstance(judge["position_bias"], float) and 0 <= judge["position_bias"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        verdict = next(v["base"] for name, v in s["judges"].items() if name.startswith("judge:"))
        expected = 1.0 if verdict["p_policy_wins"] > 0.5 else 0.0 if verdict["p_policy_wins"] < 0.5 else 0.5
        assert 0 <= verdict["p_policy_wins"] <= 1 and verdict["outcome"] == expected


def test_the_same_seed_gives_the_same_report(standalone_runs):
    _, [(first, _), (second, _)] = standalone_runs
    assert (first / "report.json").read_text() == (second / "report.json").read_text()
    assert (first / "samples.jsonl").read_text() == (second / "samples.jsonl").read_text()


def test_a_recipe_eval_stage_matches_the_standalone_command(standalone_runs, tiny_llama, prompts, tmp_path):
    """--recipe with an eval stage naming the policy by folder and `base`: the same answers and numbers."""
    from typer.testing import CliRunner

    from align.cli import app

    stage, [(standalone, _), _] = standalone_runs
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-eval",
                "model": {"name": str(tiny_llama), "precision": "fp32", "attn_implementation": "eager"},
                "quantization": {"mode": "none"},
                "stages": {
                    "eval": {
                        "policy": str(stage.resolve()),
                        "baselines": ["base"],
                        "judges": {YES: {"type": "rule", "name": "contains_marker", "marker": "yes"}},
                        "data": {"eval": str(prompts), "max_eval_rows": 6},
                        "rollout": {"engine": "hf", "temperature": 1.0, "max_new_tokens": 4},
                    }
                },
            }
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--recipe", str(recipe), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    mine = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (standalone / "samples.jsonl").read_text().splitlines()]
    assert [(s["policy"], s["baselines"]) for s in mine] == [(s["policy"], s["baselines"]) for s in theirs]
    ours, standalone_rule = (
        json.loads((out / "report.json").read_text())["results"],
        json.loads((standalone / "report.json").read_text())["results"][0],
    )
    assert ours == [standalone_rule]
    # a report is never overwritten silently
    again = CliRunner().invoke(app, ["eval", "--recipe", str(recipe), "--output-dir", str(out)])
    assert again.exit_code != 0 and "already holds a run" in str(again.exception)


def test_a_best_of_n_baseline_keeps_the_answer_its_reward_likes(standalone_runs, tiny_llama, prompts, tmp_path):
    """The yes/no policy against the best of 4 of its own answers picked by 'contains yes': the picked
    answers say yes where any draw did, so the policy (yes about half the time) wins none and loses
    where it said no; the report says what was drawn and picked."""
    from typer.testing import CliRunner

    from align.cli import app

    stage, _ = standalone_runs
    yes = {"type": "rule", "name": "contains_marker", "marker": "yes"}
    recipe = tmp_path / "eval.yaml"
    eval_stage = {
        "policy": str(stage.resolve()),
        "baselines": [{"best_of": 4, "from": str(stage.resolve()), "reward": yes}],
        "judges": {"yes": yes},
        "data": {"eval": str(prompts), "max_eval_rows": 8},
        "rollout": {"engine": "hf", "temperature": 1.0, "max_new_tokens": 4},
    }
    model = {"name": str(tiny_llama), "precision": "fp32", "attn_implementation": "eager"}
    recipe.write_text(yaml.safe_dump({"name": "tiny-eval", "model": model, "stages": {"eval": eval_stage}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--recipe", str(recipe), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads((out / "report.json").read_text())
    [picked] = report["baselines"]
    assert picked["name"] == "sft-best-of-4" and picked["best_of"] == 4 and picked["picked_by"]["marker"] == "yes"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    said_yes = ["yes" in s["baselines"]["sft-best-of-4"] for s in samples]
    assert picked["picked_reward_mean"] == sum(said_yes) / len(said_yes) == 1.0  # P(4 draws all no) = 1/16
    assert 0.2 < picked["drawn_reward_mean"] < 0.8  # the draws themselves: yes about half the time
    [row] = report["results"]
    assert row["wins"] == 0 and row["losses"] == sum("yes" not in s["policy"] for s in samples) > 0
    assert "the best of 4 answers of" in picked["description"]


def test_a_best_of_n_baseline_reads_its_stages_and_is_named_once():
    from align.config import EvalConfig
    from align.recipe import recipe_from_dict

    judges = {"yes": {"type": "rule", "name": "contains_marker", "marker": "yes"}}
    best = {"best_of": 8, "from": "sft", "reward": {"type": "learned", "from": "rm"}}
    recipe = recipe_from_dict(
        {
            "name": "r",
            "stages": {
                "sft": {"data": {"train": "a.jsonl"}},
                "rm": {"data": {"train": "p.jsonl"}},
                "eval": {"policy": "sft", "baselines": ["base", best], "judges": judges, "data": {"eval": "e.jsonl"}},
            },
        }
    )
    assert sorted(recipe.dependencies("eval")) == ["rm", "sft"]
    with pytest.raises(ValueError, match="sft-best-of-8 named twice"):
        EvalConfig(judges=judges, data={"eval": "e.jsonl"}, baselines=[best, best])
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        EvalConfig(judges=judges, data={"eval": "e.jsonl"}, baselines=[{**best, "best_of": 1}])
    with pytest.raises(ValueError, match="rm is a dpo stage|is not an earlier stage|names no earlier stage"):
        recipe_from_dict(
            {
                "name": "r",
                "stages": {
                    "sft": {"data": {"train": "a.jsonl"}},
                    "eval": {"policy": "sft", "baselines": [best], "judges": judges, "data": {"eval": "e.jsonl"}},
                },
            }
        ).resolve("eval")


def test_an_unfinished_policy_stops_before_anything_is_generated(tmp_path, prompts):
    unfinished = tmp_path / "sft"
    (unfinished / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("kind: sft\n")
    out = tmp_path / "out"
    proc = align_eval(
        "--policy",
        str(unfinished),
        "--prompts",
        str(prompts),
        "--judge",
        YES,
        "--engine",
        "hf",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "has not finished" in proc.stdout and "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_models_and_bad_judges_are_reported_before_loading(tmp_path, prompts, yes_no_model):
    from align.config import EvalConfig, RecipeError
    from align.stages.evaluate import run_eval

    def config(**changes):
        return EvalConfig.model_validate(
            {
                "model": {"name": str(yes_no_model)},
                "quantization": {"mode": "none"},
                "policy": str(yes_no_model.parent),
                "judges": {"yes": {"type": "rule", "name": "contains_marker"}},
                "data": {"eval": str(prompts)},
                **changes,
            }
        )

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_eval(config(baselines=[str(tmp_path / "nowhere")]), out)
    with pytest.raises(FileNotFoundError, match="run stage 'sft' first"):
        run_eval(config(baselines=["sft"]), out, recipe_name="never-ran")
    with pytest.raises(ValueError, match="unknown rule 'nope'"):  # now when the config is read, before run_eval
        config(judges={"j": {"type": "rule", "name": "nope"}})
    with pytest.raises(RecipeError, match=r"needs the data column\(s\) \['reference'\]"):
        run_eval(config(judges={"exact": {"type": "rule", "name": "gsm8k_exact"}}), out)
    with pytest.raises(RecipeError, match="the same model"):
        run_eval(config(policy=str(yes_no_model)), out)  # 'base' is the policy itself here
    assert not out.exists()


def test_console_table_fits_80_columns_with_judges_and_baselines_named_by_path(monkeypatch):
    from rich.console import Console

    import align.eval.report as report_module

    long_rm = "learned:/home/someone/experiments/2026-12/runs/smollm2-135m-quickstart/reward"
    long_base = "/home/someone/experiments/2026-12/runs/smollm2-135m-quickstart/sft"
    row = dict(
        wins=3,
        ties=1,
        losses=4,
        win_rate=0.4375,
        ci_low=0.1875,
        ci_high=0.6875,
        lc_win_rate=0.45,
        policy_length=118.3,
        baseline_length=115.7,
        position_bias=None,
    )
    report = {
        "policy": {"name": "grpo"},
        "prompts": {"n": 8},
        "results": [{"judge": long_rm, "baseline": long_base, **row}, {"judge": "correct", "baseline": "base", **row}],
    }
    screen = Console(width=80, record=True, highlight=False)
    monkeypatch.setattr(report_module, "console", screen)
    report_module.print_table(report)
    lines = [line.rstrip() for line in screen.export_text().splitlines()]
    assert max(len(line) for line in lines if " = " not in line) <= 80  # the name lines may be long: a path is not cut
    assert f"judge reward = {long_rm}" in lines and f"baseline sft = {long_base}" in lines  # full names once, above
    rows = [line for line in lines if "3/1/4" in line]
    assert (
        len(rows) == 2 and "reward" in rows[0] and "sft" in rows[0] and "correct" in rows[1]
    )  # one line per row, no wrapping


def test_the_engine_check_rescores_the_first_answer_of_prompts_spread_over_every_set():
    import doctest

    import align.stages.contestants

    result = doctest.testmod(align.stages.contestants)
    assert result.attempted > 0 and result.failed == 0


def test_the_report_states_each_models_engine_trainer_mismatch(tmp_path, prompts, yes_no_model, monkeypatch):
    """An engine that is not the trainer's forward (here: the hf engine reporting logprobs 0.3 too
    low, as a mismatched vLLM kernel would) is measured against the trainer on its own answers."""
    import align.stages.contestants as contestants
    import align.stages.evaluate as evaluate
    from align.config import EvalConfig

    real = contestants.rollout_engine
    monkeypatch.setattr(
        contestants, "rollout_engine", lambda *args, **kwargs: ShiftedSampler(real(*args, **kwargs), shift=0.3)
    )
    cfg = EvalConfig.model_validate(
        {
            "model": {"name": str(yes_no_model), "precision": "fp32"},
            "quantization": {"mode": "none"},
            "policy": str(yes_no_model.parent),
            "judges": {"yes": {"type": "rule", "name": "contains_marker", "marker": "yes"}},
            "data": {"eval": str(prompts)},
            "rollout": {"engine": "hf", "max_new_tokens": 4},
            "bootstrap": 100,
        }
    )
    out = evaluate.run_eval(cfg, tmp_path / "out")
    report = json.loads((out / "report.json").read_text())
    for model in [report["policy"], *report["baselines"]]:
        assert model["engine_trainer_mismatch"]["logprob_mismatch_mean"] == pytest.approx(0.3, abs=1e-4)
        assert model["engine_trainer_mismatch"]["answers"] == 8  # the first answer of each of the 8 prompts
    assert "engine vs trainer logprobs: mean 0.3000" in (out / "report.md").read_text()
    monkeypatch.setattr(contestants, "rollout_engine", real)
    plain = json.loads((evaluate.run_eval(cfg, tmp_path / "plain") / "report.json").read_text())
    assert plain["policy"]["engine_trainer_mismatch"] is None  # the hf engine in fp32 is the model's own forward
