"""Python reward functions ({type: python, function: FILE.py:NAME}): TRL's calling convention, every
way a function can go wrong named, None in weighted sums, and code imported only for the recipe run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PICK, p_yes, tiny_recipe, write_jsonl

from align.config import parse_reward, schema_of
from reward_models import build_reward
from reward_models.python import RewardFunctionError

# Written as TRL's GRPOTrainer documentation writes reward functions (conversational and standard
# formats, a dataset column as a keyword, **kwargs for the rest), not for align.
TRL_STYLE = """
import re

def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]

def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

def exact(prompts, completions, reference, **kwargs):
    return [1.0 if c[0]["content"].strip() == r else 0.0 for c, r in zip(completions, reference)]

def only_named(completions):
    return [float(len(c)) for c in completions]

async def async_yes(completions, **kwargs):
    return [1.0 if "yes" in c[0]["content"] else 0.0 for c in completions]

def yes_or_none(completions, **kwargs):
    return [1.0 if "yes" in c[0]["content"] else None for c in completions]

def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)

def short(completions, **kwargs):
    return [1.0]

def raises(completions, **kwargs):
    raise ValueError("boom")
"""

PROMPTS = [[{"role": "user", "content": "Say it."}], [{"role": "user", "content": "Say it again."}]]


@pytest.fixture()
def rewards_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # FILE.py paths are read from the folder align runs in
    path = tmp_path / "rewards.py"
    path.write_text(TRL_STYLE)
    return path


def reward(function: str, **spec):
    return build_reward(parse_reward({"type": "python", "function": f"rewards.py:{function}", **spec}))


def test_trl_style_functions_work_unchanged(rewards_file):
    answers = ["<think>a</think><answer>b</answer>", "no tags"]
    assert reward("format_reward_func")(PROMPTS, answers) == [1.0, 0.0]
    assert reward("reward_len", format="standard")(PROMPTS, ["x" * 18, "x" * 25]) == [-2.0, -5.0]
    assert reward("exact")(PROMPTS, ["42", " 7 "], reference=["42", "8"]) == [1.0, 0.0]  # a data column
    assert reward("only_named")(PROMPTS, ["ab", "c"], reference=["1", "2"]) == [1.0, 1.0]  # no **kwargs: not given
    assert reward("async_yes")(PROMPTS, ["yes", "no"]) == [1.0, 0.0]  # async def is awaited
    assert reward("only_named").name == "python rewards.py:only_named"


def test_none_is_left_out_of_a_weighted_sum_and_an_answer_nobody_scores_is_an_error(rewards_file):
    both = build_reward(
        parse_reward(
            [
                {"type": "python", "function": "rewards.py:yes_or_none", "weight": 2.0},
                {"type": "rule", "name": "contains_marker", "marker": "no", "weight": 0.5},
            ]
        )
    )
    assert both(PROMPTS, ["yes", "no"]) == [2.0, 0.5]  # answer 1: the function's None is left out, the rule counts
    assert both.parts[0][1].unscored == 1
    with pytest.raises(RewardFunctionError, match=r"gave no score \(None\) to answer 1 \(prompt: 'Say it again.'\)"):
        reward("yes_or_none")(PROMPTS, ["yes", "no"])  # alone: nothing else scores that answer
    only_none = build_reward(parse_reward([{"type": "python", "function": "rewards.py:yes_or_none"}] * 2))
    with pytest.raises(RewardFunctionError, match="scored answer 0"):
        only_none(PROMPTS, ["no", "no"])


def test_every_way_a_function_fails_is_named(rewards_file, tmp_path):
    with pytest.raises(
        RewardFunctionError, match=r"rewards.py:nan_reward returned nan for answer 0 \(prompt: 'Say it.'\)"
    ):
        reward("nan_reward")(PROMPTS, ["a", "b"])
    with pytest.raises(RewardFunctionError, match="returned 1 for 2 answers"):
        reward("short")(PROMPTS, ["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"rewards.py:raises raised on a batch of 2 answers.*boom"):
        reward("raises")(PROMPTS, ["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"needs \['reference'\], which these rows do not have"):
        reward("exact")(PROMPTS, ["a", "b"])
    with pytest.raises(RewardFunctionError, match="has no function 'nope'.*format_reward_func"):
        reward("nope")
    with pytest.raises(RewardFunctionError, match="no file .*missing.py"):
        build_reward(parse_reward({"type": "python", "function": "missing.py:f"}))
    with pytest.raises(ValueError, match="function must be FILE.py:NAME or package.module:NAME"):
        parse_reward({"type": "python", "function": "rewards.py"})
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(RewardFunctionError, match="importing broken.py failed.*not_a_module_anywhere"):
        build_reward(parse_reward({"type": "python", "function": "broken.py:f"}))


def test_reading_a_config_that_names_a_function_imports_nothing(tmp_path, monkeypatch):
    """A finished stage's saved config is read (by eval, by a stage starting from it) without running its code."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "rewards.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(completions, **k): return [0.0]\n")
    cfg = schema_of("grpo").model_validate({"reward": {"type": "python", "function": "rewards.py:f"}})
    assert cfg.reward.function == "rewards.py:f" and not marker.exists()
    build_reward(cfg.reward)  # a stage building the rewards its own recipe names: now it runs
    assert marker.exists()


def test_grpo_learns_from_a_python_reward_and_eval_judges_with_one_without_running_the_stages_own(
    tmp_path, yes_no_model
):
    """`align run` of a GRPO stage trained by a TRL-style function in a file beside the recipe: the policy says
    yes more; `align eval --judge python:...` judges it; the grpo folder's config names its training function,
    and eval (which reads that config) and `align run --dry-run` never import it - a file that leaves a marker
    when imported is put in its place - while the plan sees the edited file and would rerun the stage."""
    from align.models.trained import load_trained

    (tmp_path / "rewards.py").write_text(TRL_STYLE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PICK}] * 32)
    recipe = tiny_recipe(
        tmp_path / "grpo.yaml",
        yes_no_model,
        str(prompts),
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        stages={
            "grpo": {
                "reward": {"type": "python", "function": "rewards.py:async_yes"},
                "rollout": {"engine": "hf", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 2},
                "train": {"max_steps": 8, "lr": 1e-2, "batch_size": 16},
            }
        },
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "ALIGN_RUNS": str(tmp_path / "runs")}

    def align(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "align.cli", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)

    proc = align("run", str(recipe))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "python rewards.py:async_yes" in proc.stdout  # the plan names the reward
    grpo = tmp_path / "runs" / "tiny" / "grpo"
    base, tokenizer = load_trained(yes_no_model)
    before, after = p_yes(base, tokenizer), p_yes(load_trained(grpo)[0], tokenizer)
    assert after > before + 0.05, (before, after)
    assert "up to date" in align("run", str(recipe), "--dry-run").stdout

    marker = tmp_path / "imported"
    (tmp_path / "rewards.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "judges.py").write_text(
        "def yes(completions, **kwargs):\n    return [float('yes' in c[0]['content']) for c in completions]\n"
    )
    plan = align("run", str(recipe), "--dry-run")
    assert plan.returncode == 0 and "a Python reward's file" in plan.stdout, plan.stdout[-2000:]
    proc = align(
        *["eval", "--policy", str(grpo), "--baseline", str(yes_no_model), "--prompts", str(prompts)],
        *["--judge", "python:judges.py:yes", "--max-new-tokens", "2", "--output-dir", "eval"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not marker.exists()  # the training function named in grpo/config.yaml was never imported
    result = json.loads((tmp_path / "eval" / "report.json").read_text())["results"][0]
    assert result["judge"] == "python:judges.py:yes" and result["win_rate"] > 0.5, result
    bad = align("eval", "--policy", str(grpo), "--prompts", str(prompts), "--judge", "python:judges.py:no")
    assert bad.returncode == 2 and "judges.py has no function 'no'" in bad.stdout + bad.stderr
