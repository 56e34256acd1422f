"""`align rm` and reward_models/: Bradley-Terry maths, scoring position, save/load, rules, registry (RELIABILITY 9-13)."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys

import pytest
import torch

from align.losses import bradley_terry
from align.models.reward import MissingRewardHead, reward_scores
from align.recipe import load_recipe
from align.stages.reward import run_reward

from conftest import tiny_recipe, write_jsonl
from test_dpo import marker_pairs


def test_bradley_terry_against_hand_worked_numbers():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(2)]
    torch.testing.assert_close(bradley_terry(c, r), torch.tensor(expected))
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry(c, r, margin)[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    smoothed = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert bradley_terry(c, r, label_smoothing=0.1)[0].item() == pytest.approx(smoothed)


def train_toy(tmp_path, model_dir, steps=40, **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", marker_pairs(16, start=100))
    recipe = load_recipe(tiny_recipe(tmp_path / "rm.yaml", model_dir, str(train), stages={"reward": {}}))
    cfg = recipe.resolve("reward", [f"data.eval={held_out}", f"train.max_steps={steps}", "train.batch_size=4", "train.lr=5e-3",
                                    "lora.r=8", *[f"{k}={v}" for k, v in overrides.items()]])
    return run_reward(cfg, tmp_path / "reward", recipe_name="tiny")


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory, tiny_llama):
    return train_toy(tmp_path_factory.mktemp("rm"), tiny_llama)


def test_toy_preference_accuracy_rises_and_report_has_the_probes(toy_rm):
    manifest = json.loads((toy_rm / "manifest.json").read_text())
    held_out = manifest["held_out"]
    assert held_out["accuracy"] >= 0.9  # chance is 0.5
    assert held_out["score_std"] > 0  # no collapse
    # chosen answers are one word longer here, so a score-length correlation is expected and reported
    assert -1 <= held_out["length_correlation"] <= 1 and held_out["length_correlation"] != 0
    first = next(r for r in map(json.loads, (toy_rm / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r)
    assert first["step"] == 0 and first["eval_accuracy"] < held_out["accuracy"]


def test_scores_do_not_depend_on_padding_or_batch_mates(toy_rm, tokenizer):
    from reward_models.learned import LearnedReward

    reward = LearnedReward(toy_rm, batch_size=8)
    prompts = [[{"role": "user", "content": f"Describe scene {i}."}] for i in range(3)]
    completions = ["the cat sat zebra", "a much longer answer about a dog that sat on the mat all day", "x"]
    together = torch.tensor(reward(prompts, completions))
    alone = torch.tensor([reward([p], [c])[0] for p, c in zip(prompts, completions)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # left padding gives the same scores: read at the last attended token, positions from the mask
    rows = [reward.encode(p, c) for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        left = reward_scores(reward.model, ids, mask)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    # the score is the head applied at the end-of-turn token, which is also the pad token here:
    # transformers' own pooling (by pad id) reads an earlier token and gives another score
    assert rows[0][-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    classifier = reward.model.get_base_model()
    with torch.no_grad():
        output = reward.model(input_ids=torch.tensor([rows[0]]), output_hidden_states=True)
        at_end = classifier.score(output.hidden_states[-1][0, -1]).squeeze().float()
    torch.testing.assert_close(at_end, alone[0], atol=1e-5, rtol=0)
    assert abs(output.logits[0, 0].item() - alone[0].item()) > 1e-4


def test_learned_reward_named_by_stage(toy_rm):
    from reward_models import build_reward

    by_stage = build_reward({"type": "learned", "from": "reward"}, stage_dirs={"reward": toy_rm})
    by_path = build_reward({"type": "learned", "path": str(toy_rm)})
    prompts, completions = [[{"role": "user", "content": "Describe scene 3."}]], ["the dog sat zebra"]
    assert by_stage(prompts, completions) == by_path(prompts, completions)
    with pytest.raises(KeyError, match="names no finished stage"):
        build_reward({"type": "learned", "from": "rm2"}, stage_dirs={"reward": toy_rm})


def test_saved_reward_model_scores_identically_in_a_fresh_process(toy_rm):
    from reward_models.learned import LearnedReward

    prompts = [[{"role": "user", "content": "Describe scene 7."}]] * 2
    completions = ["the fox sat zebra", "the fox sat"]
    here = LearnedReward(toy_rm)(prompts, completions)
    code = (
        "import json,sys; from reward_models.learned import LearnedReward; "
        f"print(json.dumps(LearnedReward(sys.argv[1])({json.dumps(prompts)}, {json.dumps(completions)})))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(toy_rm)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here
    assert here[0] > here[1]


def test_a_checkpoint_missing_its_head_fails_loudly(toy_rm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from reward_models.learned import LearnedReward

    broken = tmp_path / "broken"
    shutil.copytree(toy_rm, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if "score" not in k}
    save_file(tensors, str(weights))
    with pytest.raises(MissingRewardHead, match="no reward head"):
        LearnedReward(broken)


def test_rule_docstring_examples():
    import reward_models.rules

    result = doctest.testmod(reward_models.rules)
    assert result.attempted >= 6 and result.failed == 0


def test_registry_builds_rules_and_weighted_sums():
    from reward_models import build_reward

    combined = build_reward([{"type": "rule", "name": "gsm8k_exact", "weight": 2.0}, {"type": "rule", "name": "answer_format", "weight": 0.5}])
    scores = combined([[], []], ["so #### 18", "18 I guess"], reference=["#### 18", "#### 18"])
    assert scores == [2.5, 2.0]
    with pytest.raises(KeyError, match="unknown rule"):
        build_reward({"type": "rule", "name": "nope"})
    with pytest.raises(KeyError, match="reference"):
        build_reward({"type": "rule", "name": "gsm8k_exact"})([[]], ["1"])
    assert build_reward({"type": "rule", "name": "length_penalty", "target_words": 2})([[]], ["a b c d"]) == [-1.0]
    with pytest.raises(KeyError, match="no option"):
        build_reward({"type": "rule", "name": "length_penalty", "target_word": 2})


def test_cli_rm_train_and_score(tmp_path, tiny_gpt2):
    from test_sft_stage import cli

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(10))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, str(pairs), stages={"reward": {"data": {"eval_rows": 2}}})
    proc = cli("rm", "--recipe", recipe, "train.max_steps=2", "--output-dir", tmp_path / "rm")
    assert "held-out: accuracy" in " ".join(proc.stdout.split())
    scored = cli("rm", "score", "--model", tmp_path / "rm", "--data", pairs)
    assert "10 pairs, accuracy" in " ".join(scored.stdout.split())
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "completion": "zebra"}, {"prompt": "hi", "completion": "cat"}])
    cli("rm", "score", "--model", tmp_path / "rm", "--data", rows)
    written = [json.loads(line) for line in (tmp_path / "rows.scores.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in written] == ["zebra", "cat"] and all(isinstance(r["score"], float) for r in written)
    again = cli("rm", "score", "--model", tmp_path / "rm", "--data", rows, check=False)
    assert again.returncode == 2 and "exists" in again.stdout



def test_pairwise_judge_is_order_symmetric_and_pointwise_is_a_probability(tiny_llama):
    from reward_models import build_reward

    judge = build_reward({"type": "judge", "model": str(tiny_llama), "mode": "pairwise"})
    prompts = [[{"role": "user", "content": "What is 2+2?"}]] * 2
    a, b = ["4", "It is four."], ["5", "Four, I think"]
    forward, backward = judge.compare(prompts, a, b), judge.compare(prompts, b, a)
    assert all(abs(x + y - 1) < 1e-6 for x, y in zip(forward, backward))
    assert judge.compare(prompts[:1], ["same"], ["same"]) == [pytest.approx(0.5, abs=1e-6)]
    assert judge(prompts, a, baseline=b) == forward
    with pytest.raises(KeyError, match="baseline"):
        judge(prompts, a)
    pointwise = build_reward({"type": "judge", "model": str(tiny_llama), "mode": "pointwise"})
    assert all(0 < p < 1 for p in pointwise(prompts, a))


def test_a_judge_that_always_says_a_is_caught_and_cancelled(tmp_path, tiny_llama):
    """Position bias: a judge trained to answer 'A' whatever it reads gets a bias rate of 1 and,
    because both orders are asked, no pair looks better than a coin flip."""
    from align.stages.sft import run_sft
    from reward_models.judge import PAIRWISE, LLMJudge

    rows = [{"prompt": PAIRWISE.format(question=f"q{i}", a=f"answer {i}", b=f"other {i}"), "completion": "A"} for i in range(8)]
    data = write_jsonl(tmp_path / "judge.jsonl", rows)
    recipe = load_recipe(tiny_recipe(tmp_path / "j.yaml", tiny_llama, str(data)))
    cfg = recipe.resolve("sft", ["adapter.method=full", "train.lr=2e-2", "train.max_steps=40", "train.batch_size=8"])
    out = run_sft(cfg, tmp_path / "biased", recipe_name="tiny")
    judge = LLMJudge(out)
    prompts = [[{"role": "user", "content": "q100"}], [{"role": "user", "content": "q101"}]]
    wins = judge.compare(prompts, ["answer 100", "x"], ["other 100", "y"])
    assert judge.last_position_bias == 1.0
    assert all(abs(w - 0.5) < 0.05 for w in wins)


def test_rm_trains_under_torchrun_ddp(tmp_path, tiny_llama):
    import os

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(16))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, str(pairs), stages={"reward": {}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli",
         "rm", "--recipe", str(recipe), "train.max_steps=2", "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in " ".join(proc.stdout.split())
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["steps"] == 2
