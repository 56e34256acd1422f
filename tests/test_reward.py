"""`align rm` and reward_models/: Bradley-Terry maths, scoring position, save/load, rules, registry
(RELIABILITY 9-13)."""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_recipe, write_jsonl
from test_dpo import marker_pairs

from align.losses import bradley_terry
from align.models.reward import MissingRewardHead, reward_scores
from align.recipe import load_recipe
from align.stages.reward import run_reward


def test_bradley_terry_against_hand_worked_numbers():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(2)]
    torch.testing.assert_close(bradley_terry(c, r), torch.tensor(expected))
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry(c, r, margin)[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    smoothed = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert bradley_terry(c, r, label_smoothing=0.1)[0].item() == pytest.approx(smoothed)


def test_pearson_probe_against_known_values():
    """The length-bias probe: exactly +-1 for scores linear in length, ~0 for independent ones,
    numpy's value on arbitrary data, and 0 (not NaN) when the scores have collapsed."""
    import numpy as np

    from align.stages.reward import pearson

    lengths = torch.arange(1, 41, dtype=torch.float32)
    assert pearson(3.0 * lengths - 7.0, lengths) == pytest.approx(1.0, abs=1e-12)
    assert pearson(-0.5 * lengths + 2.0, lengths) == pytest.approx(-1.0, abs=1e-12)
    # hand-worked: x = [1, 2, 3], y = [1, 3, 2] -> centred [-1, 0, 1] . [-1, 1, 0] = 1, norms sqrt(2) each -> 0.5
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(0.5, abs=1e-12)
    generator = torch.Generator().manual_seed(0)
    scores, lens = torch.randn(50, generator=generator), torch.randint(1, 200, (50,), generator=generator).float()
    assert pearson(scores, lens) == pytest.approx(float(np.corrcoef(scores.numpy(), lens.numpy())[0, 1]), abs=1e-9)
    many = torch.randint(1, 200, (20000,), generator=generator).float()
    assert abs(pearson(torch.randn(20000, generator=generator), many)) < 0.03  # independent: |r| ~ 1/sqrt(n) = 0.007
    assert pearson(torch.full((10,), 0.3), lengths[:10]) == 0.0  # collapsed scores: no correlation, not NaN


def held_out_length_correlation(folder) -> float:
    """numpy Pearson r between the saved model's score of each held-out answer and its labelled length."""
    import numpy as np

    from align.data.preference_data import load_pairs
    from align.models.trained import stage_config
    from reward_models.learned import LearnedReward

    reward, cfg = LearnedReward(folder), stage_config(folder)
    _, pairs, _ = load_pairs(cfg.data, reward.tokenizer, cfg.seed)
    rows = [pair.prompt_ids + ids for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    lengths = [len(ids) for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    batch = reward.collate([{"input_ids": ids, "labels": [-100] * len(ids)} for ids in rows])
    with torch.no_grad():
        scores = reward_scores(reward.model, batch["input_ids"], batch["attention_mask"])
    assert len(pairs) == 16 and len(set(lengths)) > 1
    return float(np.corrcoef(scores.double().numpy(), np.array(lengths, dtype=float))[0, 1])


def train_toy(tmp_path, model_dir, steps=40, **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", marker_pairs(16, start=100))
    recipe = load_recipe(tiny_recipe(tmp_path / "rm.yaml", model_dir, str(train), stages={"reward": {}}))
    cfg = recipe.resolve(
        "reward",
        [
            f"data.eval={held_out}",
            f"train.max_steps={steps}",
            "train.batch_size=4",
            "train.lr=5e-3",
            "lora.r=8",
            *[f"{k}={v}" for k, v in overrides.items()],
        ],
    )
    return run_reward(cfg, tmp_path / "reward", recipe_name="tiny")


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory, tiny_llama):
    return train_toy(tmp_path_factory.mktemp("rm"), tiny_llama)


def test_a_reward_model_started_from_a_policy_reads_answers_as_that_policy_does(tmp_path, tiny_llama, tokenizer):
    """rm from: sft - the reward model's adapter starts as the SFT adapter (InstructGPT's RM starts from
    the SFT model): before any step its backbone's hidden states are the SFT policy's, exactly; the
    trained stage records where it started; an adapter of another shape is refused by name."""
    from align.config import RecipeError
    from align.models.adapters import add_adapter, start_from_adapter
    from align.models.reward import load_reward_base
    from align.models.trained import load_trained
    from align.stages.sft import run_sft

    answers = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i} it is."} for i in range(8)]
    )
    recipe = load_recipe(tiny_recipe(tmp_path / "sft.yaml", tiny_llama, str(answers)))
    sft = run_sft(recipe.resolve("sft"), tmp_path / "sft", recipe_name="tiny")
    cfg = recipe.resolve("sft")
    head_model = lambda lora: add_adapter(  # noqa: E731  a fresh reward model: base, scalar head, new adapter
        load_reward_base(cfg.model, cfg.quantization, "fp32", tiny_llama),
        cfg.adapter,
        lora,
        False,
        False,
        task_type="SEQ_CLS",
    )
    rm = head_model(cfg.lora)
    assert start_from_adapter(rm, sft / "adapter") > 0
    policy, _ = load_trained(sft, precision="fp32")
    ids = torch.tensor([tokenizer.encode("3 it is.")])
    hidden = lambda model: model.base_model.model.model(input_ids=ids).last_hidden_state  # noqa: E731
    with torch.no_grad():
        ours, theirs, fresh = hidden(rm), hidden(policy), hidden(head_model(cfg.lora))
    assert torch.equal(ours, theirs) and not torch.allclose(fresh, theirs)  # the SFT adapter moved it; we copied it

    wider = head_model(cfg.lora.model_copy(update={"r": 8}))
    with pytest.raises(RecipeError, match="cannot start this one - they differ in r"):
        start_from_adapter(wider, sft / "adapter")

    out = train_toy(tmp_path, tiny_llama, steps=2, **{"lora.r": 4, "lora.alpha": 8})
    assert json.loads((out / "manifest.json").read_text())["from_stage"] is None
    started = run_reward(
        load_recipe(
            tiny_recipe(tmp_path / "rm.yaml", tiny_llama, str(tmp_path / "train.jsonl"), stages={"reward": {}})
        ).resolve("reward", ["train.max_steps=2"]),
        tmp_path / "rm-from-sft",
        recipe_name="tiny",
        from_dir=sft,
    )
    assert json.loads((started / "manifest.json").read_text())["from_stage"] == str(sft)


def test_toy_preference_accuracy_rises_and_report_has_the_probes(toy_rm):
    manifest = json.loads((toy_rm / "manifest.json").read_text())
    held_out = manifest["held_out"]
    assert held_out["accuracy"] >= 0.9  # chance is 0.5
    assert held_out["score_std"] > 0  # no collapse
    # the reported score-length correlation is Pearson's r over every held-out answer (chosen and
    # rejected) between its score and its completion length; recompute it independently with numpy
    assert held_out["length_correlation"] == pytest.approx(held_out_length_correlation(toy_rm), abs=1e-4)
    first = next(
        r for r in map(json.loads, (toy_rm / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r
    )
    assert first["step"] == 0 and first["eval_accuracy"] < held_out["accuracy"]
    # how far to trust it: a bootstrap interval around the accuracy over the pairs, calibration, by margin
    assert held_out["accuracy_low"] <= held_out["accuracy"] <= held_out["accuracy_high"] <= 1.0
    assert 0 <= held_out["calibration_error"] <= 0.5
    groups = held_out["accuracy_by_margin"]
    assert (
        sum(g["pairs"] for g in groups) == held_out["pairs"]
        and groups[-1]["abs_margin_low"] >= groups[0]["abs_margin_high"]
    )


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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rows_give_the_two_row_scores_and_gradients(tiny_model_dir, tokenizer, attention):
    """One row [prompt, chosen, rejected] with the prompt run once must give every answer the score (and
    the head and weights the gradient) of its own [prompt, answer] row; pairs of unequal lengths so
    both layouts pad, and a rejected answer longer than the chosen one."""
    from transformers import AutoModelForSequenceClassification

    from align.data.batching import PairCollator, SharedPromptCollator
    from align.models.reward import pair_scores

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, dtype=torch.float32, attn_implementation=attention
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(10, vocab, (n,), generator=generator).tolist()
    rows = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
        for p, c, r in ((7, 3, 9), (2, 5, 1), (11, 4, 4))
    ]
    shared = SharedPromptCollator(tokenizer.pad_token_id)(rows)
    assert shared["input_ids"].shape == (3, 20)  # the longest row's 7 + 3 + 1 + 9 tokens, not 2 x (prompt + answer)

    def scores_and_grads(batch):
        model.zero_grad()
        scores = pair_scores(model, batch)
        (scores * torch.linspace(1, 2, len(scores))).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, our_grads = scores_and_grads(shared)
    expected, expected_grads = scores_and_grads(PairCollator(tokenizer.pad_token_id)(rows))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == expected_grads.keys() and "score.weight" in our_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # each score is its answer's own: scoring one answer alone gives it
    alone = pair_scores(model, PairCollator(tokenizer.pad_token_id)([rows[1]])).detach()
    torch.testing.assert_close(ours[[1, 4]], alone, atol=1e-5, rtol=1e-5)
    assert shared["answer_lengths"].tolist() == [3, 5, 4, 9, 1, 4]


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


def test_reward_specs_are_typed_round_trip_and_name_the_part_that_is_wrong(tmp_path):
    """Issue 14: one typed union serves RL rewards, the sample stage, the checkup and eval judges."""
    from align.config import LearnedSpec, RuleSpec, parse_reward
    from reward_models import build_reward

    spec = parse_reward(
        [
            {"type": "rule", "name": "length_penalty", "target_words": 5, "weight": 0.5},
            {"type": "learned", "from": "rm"},
        ]
    )
    assert isinstance(spec[0], RuleSpec) and spec[0].options == {"target_words": 5} and spec[0].weight == 0.5
    assert isinstance(spec[1], LearnedSpec) and spec[1].from_stage == "rm" and spec[1].batch_size == 8
    written = [part.model_dump(mode="json", by_alias=True, exclude_none=True) for part in spec]
    assert parse_reward(written) == spec  # what config.yaml holds reads back as the same spec
    with pytest.raises(ValueError, match=r"reward\[1\]: a learned reward has no key 'pth' - did you mean 'path'"):
        parse_reward([{"type": "rule", "name": "answer_format"}, {"type": "learned", "pth": "x"}])
    with pytest.raises(ValueError, match="give from .* or path|needs from or path"):
        parse_reward({"type": "learned", "from": "rm", "path": "x"})
    # one reward with a weight is that reward, scaled (it used to be an unknown option of the rule)
    scaled = build_reward(parse_reward({"type": "rule", "name": "length_penalty", "target_words": 2, "weight": 2.0}))
    assert scaled([[]], ["a b c d"]) == [-2.0]
    # the CLI's --judge strings parse into the same type: a misspelt rule is a bad option, before anything loads
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.cli",
            "eval",
            "--policy",
            str(tmp_path),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--judge",
            "rule:gsm8k_exat",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2 and "did you mean 'gsm8k_exact'" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_registry_builds_rules_and_weighted_sums():
    from reward_models import build_reward

    combined = build_reward(
        [
            {"type": "rule", "name": "gsm8k_exact", "weight": 2.0},
            {"type": "rule", "name": "answer_format", "weight": 0.5},
        ]
    )
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
    said = " ".join(scored.stdout.split())
    assert (
        "10 pairs, accuracy" in said and "(95% interval" in said and "calibration error" in said and "|margin|" in said
    )
    rows = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": "hi", "completion": "zebra"}, {"prompt": "hi", "completion": "cat"}]
    )
    cli("rm", "score", "--model", tmp_path / "rm", "--data", rows)
    written = [json.loads(line) for line in (tmp_path / "rows.scores.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in written] == ["zebra", "cat"] and all(
        isinstance(r["score"], float) for r in written
    )
    again = cli("rm", "score", "--model", tmp_path / "rm", "--data", rows, check=False)
    assert again.returncode == 2 and "exists" in again.stdout


class KnownJudgeModel(torch.nn.Module):
    """A stand-in judge LM with a known taste: it decodes each prompt the judge built and, at the
    last attended token only, puts logit ``content`` on the letter of the answer containing '4'
    (0 when neither or both do) plus ``bias`` on 'A'. Every other position gets the opposite
    verdict, so reading the wrong token (padding, an off-by-one) gives the wrong answer."""

    def __init__(self, tokenizer, options, content, bias=0.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the judge reads the device from the parameters
        self.tokenizer, self.options, self.content, self.bias = tokenizer, options, content, bias

    def verdict(self, text):
        import re

        a, b = re.search(r"Answer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\nWhich", text, re.S).groups()
        return self.content * (("4" in a) - ("4" in b)) + self.bias

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        first = self.options[0]
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            gap = self.verdict(self.tokenizer.decode(ids[mask.bool()]))
            logits[row, :, first] = -gap
            logits[row, int(mask.nonzero()[-1]), first] = gap
        return SimpleNamespace(logits=logits)


def test_pairwise_judge_prefers_the_known_better_answer_in_both_orders_and_measures_position_bias(tiny_llama):
    from reward_models import build_reward

    sig = lambda z: 1 / (1 + math.exp(-z))
    judge = build_reward({"type": "judge", "model": str(tiny_llama), "mode": "pairwise", "batch_size": 4})
    q = [{"role": "user", "content": "What is 2+2?"}]
    # prompts of different lengths in one batch of four, so padding is exercised; '4' marks the better answer
    good, bad = (
        ["4", "It is 4.", "The sum is 4, since two and two make four.", "4"],
        ["5", "It is five.", "22", "Three, I believe, or so."],
    )
    prompts = [q, [{"role": "user", "content": "Add two and two, please, and say the total."}], q, q]

    judge.model = KnownJudgeModel(judge.tokenizer, judge.options, content=2.0)  # no position preference
    forward, backward = judge.compare(prompts, good, bad), judge.compare(prompts, bad, good)
    assert forward == pytest.approx([sig(2.0)] * 4, abs=1e-6)  # the better answer wins when shown first ...
    assert backward == pytest.approx([sig(-2.0)] * 4, abs=1e-6)  # ... and loses when it is the other one
    assert judge.last_position_bias == 0.0
    assert judge(prompts, good, baseline=bad) == forward
    with pytest.raises(KeyError, match="baseline"):
        judge(prompts, good)

    # a mild preference for slot A (logit +1): each order alone is skewed, the two-order mean is
    # (sig(c + d) + sig(c - d)) / 2, the verdict does not flip, so no position bias is counted
    judge.model = KnownJudgeModel(judge.tokenizer, judge.options, content=2.0, bias=1.0)
    assert judge.compare(prompts, good, bad) == pytest.approx([(sig(3.0) + sig(1.0)) / 2] * 4, abs=1e-6)
    assert judge.compare(prompts, bad, good) == pytest.approx([(sig(-1.0) + sig(-3.0)) / 2] * 4, abs=1e-6)
    assert judge.last_position_bias == 0.0
    # two pairs with no better answer: the slot decides both orders -> bias rate 2 / 4, win 0.5 for those
    ties = judge.compare(prompts, [good[0], "five", good[2], "six"], [bad[0], "seven", bad[2], "eight"])
    assert judge.last_position_bias == 0.5
    assert ties[1] == ties[3] == pytest.approx(0.5, abs=1e-6) and ties[0] == ties[2] == pytest.approx(
        (sig(3.0) + sig(1.0)) / 2, abs=1e-6
    )
    # a slot preference stronger than the content: the verdict follows the position in every pair
    judge.model = KnownJudgeModel(judge.tokenizer, judge.options, content=1.0, bias=3.0)
    assert judge.compare(prompts, good, bad) == pytest.approx([(sig(4.0) + sig(-2.0)) / 2] * 4, abs=1e-6)
    assert judge.last_position_bias == 1.0

    pointwise = build_reward({"type": "judge", "model": str(tiny_llama), "mode": "pointwise"})
    assert all(0 < p < 1 for p in pointwise(prompts, good))


def test_a_judge_that_always_says_a_is_caught_and_cancelled(tmp_path, tiny_llama):
    """Position bias: a judge trained to answer 'A' whatever it reads gets a bias rate of 1 and,
    because both orders are asked, no pair looks better than a coin flip."""
    from align.stages.sft import run_sft
    from reward_models.judge import PAIRWISE, LLMJudge

    rows = [
        {"prompt": PAIRWISE.format(question=f"q{i}", a=f"answer {i}", b=f"other {i}"), "completion": "A"}
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "judge.jsonl", rows)
    recipe = load_recipe(tiny_recipe(tmp_path / "j.yaml", tiny_llama, str(data)))
    cfg = recipe.resolve("sft", ["adapter.method=full", "train.lr=2e-2", "train.max_steps=40", "train.batch_size=8"])
    out = run_sft(cfg, tmp_path / "biased", recipe_name="tiny")
    judge = LLMJudge(out)
    prompts = [[{"role": "user", "content": "q100"}], [{"role": "user", "content": "q101"}]]
    wins = judge.compare(prompts, ["answer 100", "x"], ["other 100", "y"])
    assert judge.last_position_bias == 1.0
    assert all(abs(w - 0.5) < 0.05 for w in wins)


@pytest.mark.heavy
def test_rm_under_torchrun_ddp_shards_pairs_and_equals_one_process(tmp_path, tiny_llama, monkeypatch):
    """2 processes x 2 pairs (gloo) equal 1 process x 4 pairs: different pairs on each rank, the
    same global batch, the same adapter + head weights and losses (see test_sft_stage for the tolerance)."""
    from test_sft_stage import DDP_EXACT, assert_ddp_matches_one_process, record_rows_here, torchrun_recorded

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(8))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, str(pairs), stages={"reward": {}})
    _, ddp_rows = torchrun_recorded(
        tmp_path, "rm", "--recipe", recipe, *DDP_EXACT, "train.batch_size=2", "--output-dir", tmp_path / "ddp"
    )
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["steps"] == 2
    record_rows_here(monkeypatch, tmp_path / "one-rows")
    run_reward(
        load_recipe(recipe).resolve("reward", DDP_EXACT + ["train.batch_size=4"]), tmp_path / "one", recipe_name="tiny"
    )
    # a step's rows are its pairs, each one row [prompt, chosen, rejected]: 2 per rank, 4 in one process
    assert_ddp_matches_one_process(
        ddp_rows, tmp_path / "one-rows", tmp_path / "ddp", tmp_path / "one", per_rank=2, steps=2
    )
