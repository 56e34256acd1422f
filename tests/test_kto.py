"""`align kto`: labelled-answer data, the loss against hand-worked numbers and TRL's KTOTrainer,
step-0 exactness (every term half its weight, z0 = 0), learning a toy preference, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_tiny, tiny_recipe, write_jsonl
from test_dpo import marker_pairs

from align.config import DataConfig, KTOOptions
from align.data.batching import PairCollator
from align.data.loading import DataError
from align.data.unpaired_data import encode_labelled_files, with_kl_answers
from align.losses import kto
from align.recipe import load_recipe
from align.stages.kto import SIDES, KTOTrainer, run_kto


def unpaired(pairs: list[dict]) -> list[dict]:
    """Marker pairs as unpaired rows, alternating: the chosen answer of even rows (desirable), the
    rejected one of odd rows (undesirable), so no prompt appears with both answers."""
    return [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
        for i, p in enumerate(pairs)
    ]


def kto_recipe(tmp_path, model_dir, train, **stage):
    return load_recipe(tiny_recipe(tmp_path / "r.yaml", model_dir, str(train), stages={"kto": stage}))


# ---------------------------------------------------------------- loss, hand-worked


def test_kto_loss_against_hand_worked_numbers():
    policy, ref = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
    desirable = torch.tensor([True, False])
    z0 = torch.tensor(0.5)
    got = kto(policy, ref, desirable, z0, beta=0.5, desirable_weight=2.0, undesirable_weight=0.75)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # desirable: r = 1, 2 * (1 - sigmoid(0.5 * (1 - 0.5))); undesirable: r = -1, 0.75 * (1 - sigmoid(0.5 * (0.5 + 1)))
    assert got.tolist() == pytest.approx([2 * (1 - sigmoid(0.25)), 0.75 * (1 - sigmoid(0.75))])
    # policy == reference and z0 = 0: every term is half its weight
    start = kto(ref, ref, desirable, torch.tensor(0.0), beta=3.0, desirable_weight=2.0, undesirable_weight=0.75)
    assert start.tolist() == [1.0, 0.375]


# ---------------------------------------------------------------- data


def test_labelled_formats_pairs_and_bad_labels_are_named(tmp_path, tokenizer):
    rows = [
        {"prompt": "Say hi.", "completion": "hi", "label": True},
        {"messages": [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "no"}], "label": False},
        {"prompt": "Pick.", "chosen": "good", "rejected": "bad"},  # a pair: two examples
        {"prompt": "Say yes.", "completion": "yes", "label": 1},
        {"prompt": "Say yes.", "completion": "yes"},
        {"prompt": "Say yes.", "completion": "yes", "label": "true"},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    grouped, report = encode_labelled_files([str(path)], tokenizer, DataConfig(), "train")
    assert [[e.desirable for e in row] for row in grouped] == [[True], [False], [True, False]]
    examples = [e for row in grouped for e in row]
    assert report.read == 6 and report.kept == 3 and sum(report.dropped.values()) == 3
    problems = [str(p) for p in report.problems]
    assert all(f"{path}" in p and "field 'label'" in p for p in problems)
    assert "row 4" in problems[0] and "got 1" in problems[0] and "row 5" in problems[1] and "row 6" in problems[2]
    # the pair's two examples share the prompt ids; a labelled answer's ids end with the end of turn
    assert examples[2].prompt_ids == examples[3].prompt_ids
    assert tokenizer.decode(examples[0].completion_ids).startswith("hi")


def test_mismatched_answers_are_another_rows_seeded_and_fit_the_budget(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", unpaired(marker_pairs(7)))
    examples = [row[0] for row in encode_labelled_files([str(path)], tokenizer, DataConfig(), "train")[0]]
    rows = with_kl_answers(examples, seed=3, max_length=10**6)
    own = [r["completion_ids"] for r in rows]
    assert all(r["kl_ids"] != r["completion_ids"] for r in rows)  # never its own answer
    assert sorted(map(tuple, (r["kl_ids"] for r in rows))) == sorted(map(tuple, own))  # each answer used once
    assert rows == with_kl_answers(examples, seed=3, max_length=10**6)
    assert rows != with_kl_answers(examples, seed=4, max_length=10**6)
    budget = len(rows[0]["prompt_ids"]) + 3
    assert all(len(r["prompt_ids"]) + len(r["kl_ids"]) <= budget for r in with_kl_answers(examples, 3, budget))
    with pytest.raises(DataError, match="at least 2"):
        with_kl_answers(examples[:1], 0, 100)


# ---------------------------------------------------------------- against TRL


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.5)])
def test_loss_and_gradients_equal_trl_kto_trainer(tmp_path, tiny_llama, tokenizer, weights):
    import datasets
    import peft
    from transformers import TrainingArguments
    from trl import KTOConfig
    from trl import KTOTrainer as TRLKTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    torch.manual_seed(0)  # the adapter's A matrices: the same whatever ran before
    model = peft.get_peft_model(
        load_tiny(tiny_llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    desirable_weight, undesirable_weight = weights
    trl = TRLKTOTrainer(
        model=model,
        args=KTOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=0.2,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}]
        ),
        processing_class=tokenizer,
    )
    # move the policy away from the reference: the base, i.e. our adapter disabled, and TRL's frozen
    # 'ref' copy of the adapter made at its start, whose B is still 0
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name and ".default." in name:
            param.data.normal_(0, 3.0)

    grouped, _ = encode_labelled_files(
        [str(write_jsonl(tmp_path / "k.jsonl", unpaired(marker_pairs(5))))], tokenizer, DataConfig(), "train"
    )
    examples = [row[0] for row in grouped]
    rows = with_kl_answers(examples, seed=0, max_length=10**6)
    ours = KTOTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], use_cpu=True),
        options=KTOOptions(
            beta=0.2, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, reference="live"
        ),
    )
    trl_rows = [
        {
            "prompt_ids": r["prompt_ids"],
            "completion_ids": r["completion_ids"],
            "KL_completion_ids": r["kl_ids"],
            "label": r["label"],
        }
        for r in rows
    ]

    def loss_and_grads(compute):
        model.train()
        model.zero_grad()
        value = compute()
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    our_loss, our_grads = loss_and_grads(
        lambda: ours.compute_loss(model, PairCollator(tokenizer.pad_token_id, sides=SIDES)(rows))
    )
    our_z0 = ours._stats["kl"][-1]
    trl_loss, trl_grads = loss_and_grads(
        lambda: trl._compute_loss(model, DataCollatorForUnpairedPreference(tokenizer.pad_token_id)(trl_rows), False)
    )
    assert abs(ours._stats["rewards/chosen"][-1]) > 0.02  # the policy really moved (0.044 measured)
    assert our_z0 > 0.05  # 0.243 measured: the reference point shifts every term, not the clamp's 0
    assert our_z0 == pytest.approx(trl._metrics["train"]["kl"][-1], rel=1e-4)
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the stage


def first_eval(run) -> dict:
    return next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r)


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_step_zero_loss_is_half_and_the_reference_point_zero(tmp_path, tiny_llama, reference):
    rows = write_jsonl(tmp_path / "kto.jsonl", unpaired(marker_pairs(12)))
    cfg = kto_recipe(tmp_path, tiny_llama, rows).resolve(
        "kto", [f"kto.reference={reference}", "data.eval_rows=4", "train.max_steps=1"]
    )
    start = first_eval(run_kto(cfg, tmp_path / "kto", recipe_name="tiny"))
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert start["eval_kl"] == pytest.approx(0, abs=1e-6) and start["eval_rewards/chosen"] == pytest.approx(0, abs=1e-6)


def test_toy_preference_is_learned_from_unpaired_answers(tmp_path, tiny_llama):
    """Desirable answers carry a marker word: held-out desirable answers end with a higher implied
    reward than undesirable ones, and the reference point z0 grows from 0 as the policy moves."""
    train = write_jsonl(tmp_path / "train.jsonl", unpaired(marker_pairs(48)))
    held_out = write_jsonl(tmp_path / "eval.jsonl", unpaired(marker_pairs(16, start=100)))
    cfg = kto_recipe(tmp_path, tiny_llama, train, data={"eval": str(held_out)}).resolve(
        "kto", ["train.max_steps=30", "train.batch_size=4", "train.lr=5e-3", "lora.r=8", "kto.beta=0.5"]
    )
    out = run_kto(cfg, tmp_path / "kto", recipe_name="tiny")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    end = evals[-1]
    assert end["eval_rewards/chosen"] - end["eval_rewards/rejected"] > 0.5
    assert end["eval_loss"] < evals[0]["eval_loss"] - 0.05
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "kto" and manifest["status"] == "complete" and manifest["steps"] == 30


def test_cli_kto_end_to_end_with_pairs_as_data(tmp_path, tiny_gpt2):
    from test_sft_stage import cli

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(10))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, str(pairs), stages={"kto": {"data": {"eval_rows": 2}}})
    proc = cli("kto", "--recipe", recipe, "train.max_steps=2", "--output-dir", tmp_path / "out")
    shown = " ".join(proc.stdout.split())
    assert "8 desirable, 8 undesirable" in shown and "read 10" in shown
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["loss"] == "kto"
