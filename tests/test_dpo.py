"""`align dpo`: pairs data, losses against hand-worked numbers and TRL, step-0 exactness, learning
(RELIABILITY 5, 7, 9-11, 19, 21)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, load_tiny, tiny_recipe, write_jsonl

from align.config import DataConfig, ORPOConfig, ORPOOptions
from align.data.batching import PairCollator, SharedPromptCollator
from align.data.preference_data import encode_pair_files, to_pair_messages
from align.data.templating import encode_prompt
from align.losses import PreferenceLoss, dpo_robust, dpo_sigmoid, ipo, orpo, simpo
from align.recipe import load_recipe
from align.stages.dpo import PreferenceSettings, run_dpo
from align.stages.sft import run_sft

LN2 = math.log(2)


def marker_pairs(n: int, start: int = 0) -> list[dict]:
    """A learnable toy preference: the chosen answer ends with the marker word 'zebra'."""
    animals = ["cat", "dog", "bird", "fish", "cow", "fox"]
    rows = []
    for i in range(start, start + n):
        text = f"the {animals[i % 6]} number {i} sat on the mat"
        rows.append({"prompt": f"Describe scene {i}.", "chosen": text + " zebra", "rejected": text})
    return rows


# ---------------------------------------------------------------- losses, hand-worked


def test_losses_against_hand_worked_numbers():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    h = 0.5 * ((-10 + 11) - (-12 + 11))  # beta 0.5 -> h = 1.0
    assert dpo_sigmoid(pc, pr, rc, rr, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-h)))
    cdpo = 0.9 * math.log(1 + math.exp(-h)) + 0.1 * math.log(1 + math.exp(h))
    assert dpo_sigmoid(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1).item() == pytest.approx(cdpo)
    robust = (0.9 * math.log(1 + math.exp(-h)) - 0.1 * math.log(1 + math.exp(h))) / 0.8
    assert dpo_robust(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1).item() == pytest.approx(robust)
    tokens_c, tokens_r = torch.tensor([4]), torch.tensor([2])
    ipo_h = (1 / 4) - (-1 / 2)
    assert ipo(pc, pr, rc, rr, beta=0.5, chosen_tokens=tokens_c, rejected_tokens=tokens_r).item() == pytest.approx(
        (ipo_h - 1.0) ** 2
    )
    simpo_m = 2.0 * (-10 / 4 - -12 / 2) - 0.5
    assert simpo(pc, pr, beta=2.0, gamma=0.5, chosen_tokens=tokens_c, rejected_tokens=tokens_r).item() == pytest.approx(
        math.log(1 + math.exp(-simpo_m))
    )
    # ORPO on per-token means -2.5 and -6: log odds = log p/(1-p) for each, their difference in the sigmoid
    odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    log_or = odds(-10 / 4) - odds(-12 / 2)
    assert orpo(pc, pr, beta=0.1, chosen_tokens=tokens_c, rejected_tokens=tokens_r).item() == pytest.approx(
        0.1 * math.log(1 + math.exp(-log_or))
    )
    # near p = 1 (mean logprob -1e-9) the odds stay finite where log(1 - exp(m)) in float would not
    assert torch.isfinite(
        orpo(torch.tensor([-1e-9]), pr, beta=1.0, chosen_tokens=torch.tensor([1]), rejected_tokens=tokens_r)
    )
    # policy == reference: DPO is ln 2 whatever beta
    assert dpo_sigmoid(rc, rr, rc, rr, beta=3.0).item() == pytest.approx(LN2, abs=1e-7)
    assert not PreferenceLoss.simpo.needs_reference and PreferenceLoss.sigmoid.needs_reference
    # every recipe choice is its own member (an alias would vanish from loops over the enum)
    assert [loss.name for loss in PreferenceLoss] == ["sigmoid", "cdpo", "robust", "ipo", "simpo", "orpo"]


# ---------------------------------------------------------------- data


def test_pair_formats_share_prompt_ids_and_match_the_rollout_prompt(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "Summarize: the sky is blue."}]
    rows = [
        {"prompt": "Summarize: the sky is blue.", "chosen": "Blue sky.", "rejected": "Green sky."},
        {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": "Blue sky."}],
            "rejected": [{"role": "assistant", "content": "Green sky."}],
        },
        {
            "chosen": messages + [{"role": "assistant", "content": "Blue sky."}],
            "rejected": messages + [{"role": "assistant", "content": "Green sky."}],
        },
    ]
    pairs, report = encode_pair_files([str(write_jsonl(tmp_path / "p.jsonl", rows))], tokenizer, DataConfig(), "train")
    assert report.kept == 3
    assert all(p.prompt_ids == encode_prompt(tokenizer, messages) for p in pairs)
    assert all((p.chosen_ids, p.rejected_ids) == (pairs[0].chosen_ids, pairs[0].rejected_ids) for p in pairs)
    assert tokenizer.decode(pairs[0].chosen_ids) == "Blue sky.<|im_end|>"


def test_pairs_with_a_history_split_at_the_last_prompt_turn(tmp_path, tokenizer):
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ]
    row = {
        "chosen": history + [{"role": "assistant", "content": "Blue."}],
        "rejected": history + [{"role": "assistant", "content": "Dog."}],
    }
    pairs, _ = encode_pair_files([str(write_jsonl(tmp_path / "h.jsonl", [row]))], tokenizer, DataConfig(), "train")
    assert pairs[0].prompt_ids == encode_prompt(tokenizer, history)
    assert tokenizer.decode(pairs[0].chosen_ids) == "Blue.<|im_end|>"


def test_pair_truncation_is_one_budget_and_bad_pairs_are_counted(tmp_path, tokenizer):
    long = "word " * 100
    rows = [
        {"prompt": "hi", "chosen": long, "rejected": "short"},  # 1 truncated: both cut to one budget
        {"prompt": "hi", "chosen": "same", "rejected": "same"},  # 2 identical pair
        {"prompt": "long " * 100, "chosen": "a", "rejected": "b"},  # 3 prompt fills max_length
        {"prompt": "hi", "chosen": None, "rejected": "b"},  # 4 missing field
        {"prompt": "hi", "chosen": "a", "rejected": "b"},  # 5 kept
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, report = encode_pair_files([str(path)], tokenizer, DataConfig(max_length=48, on_bad_rows="skip"), "train")
    assert (report.read, report.kept, report.truncated) == (5, 1, 1)
    assert dict(report.dropped) == {"identical_pair": 1, "prompt_too_long": 1, "missing_field": 1}
    truncated = pairs[0]
    assert len(truncated.prompt_ids) + len(truncated.chosen_ids) == 48 and len(truncated.rejected_ids) >= 1
    assert {(p.row, p.field) for p in report.problems} == {(2, "rejected"), (4, "chosen")}


def test_implicit_prompt_must_share_everything_but_the_answer():
    from align.data.formats import RowError

    a = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    b = [{"role": "user", "content": "DIFFERENT"}, {"role": "assistant", "content": "z"}]
    with pytest.raises(RowError):
        to_pair_messages({"chosen": a, "rejected": b})
    prompt, chosen, rejected = to_pair_messages(
        {"chosen": a, "rejected": a[:1] + [{"role": "assistant", "content": "w"}]}
    )
    assert prompt == a[:1] and (chosen, rejected) == ("y", "w")


# ---------------------------------------------------------------- the stage


def dpo_recipe(tmp_path, model_dir, train, **sections):
    sections.setdefault("stages", {"dpo": {}})
    return load_recipe(tiny_recipe(tmp_path / "dpo.yaml", model_dir, str(train), **sections))


def first_eval(run) -> dict:
    return next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r)


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_step_zero_loss_is_ln2_for_a_fresh_adapter(tmp_path, tiny_llama, reference):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(12))
    cfg = dpo_recipe(tmp_path, tiny_llama, pairs).resolve(
        "dpo", [f"dpo.reference={reference}", "data.eval_rows=4", "train.max_steps=1"]
    )
    out = run_dpo(cfg, tmp_path / "dpo", recipe_name="tiny")
    start = first_eval(out)
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    assert start["eval_rewards/chosen"] == pytest.approx(0, abs=1e-6) and start[
        "eval_rewards/rejected"
    ] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_step_zero_loss_is_ln2_when_starting_from_an_sft_adapter(tmp_path, tiny_llama, reference):
    sft_data = str(FIXTURES / "gsm8k-40.jsonl")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(12))
    stages = {
        "sft": {"data": {"train": sft_data}, "train": {"max_steps": 3}},
        "dpo": {
            "from": "sft",
            "data": {"train": str(pairs), "eval_rows": 4},
            "train": {"max_steps": 2},
            "dpo": {"reference": reference},
        },
    }
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_llama, sft_data, stages=stages))
    sft_out = run_sft(recipe.resolve("sft"), tmp_path / "sft", recipe_name="tiny")
    out = run_dpo(recipe.resolve("dpo"), tmp_path / "dpo", recipe_name="tiny", from_dir=sft_out)
    start = first_eval(out)
    assert start["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    # ln 2 means reference == policy at step 0; the policy is the SFT adapter, not the base: its
    # step-0 logprobs differ from those of a run that starts from the base
    fresh = run_dpo(recipe.resolve("dpo", ["from=null"]), tmp_path / "fresh", recipe_name="tiny")
    assert abs(start["eval_logps/chosen"] - first_eval(fresh)["eval_logps/chosen"]) > 1e-3
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    from safetensors.torch import load_file

    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    started = load_file(str(sft_out / "adapter" / "adapter_model.safetensors"))
    assert trained.keys() == started.keys()  # the frozen reference copy is not saved
    assert all(not torch.equal(trained[k], started[k]) for k in trained if "lora_B" in k)


def test_toy_preference_is_learned(tmp_path, tiny_llama):
    """Chosen answers carry a marker word: held-out reward accuracy goes above 0.9."""
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", marker_pairs(16, start=100))
    cfg = dpo_recipe(tmp_path, tiny_llama, train).resolve(
        "dpo",
        [
            f"data.eval={held_out}",
            "train.max_steps=30",
            "train.batch_size=4",
            "train.lr=5e-3",
            "lora.r=8",
            "dpo.beta=0.5",
        ],
    )
    out = run_dpo(cfg, tmp_path / "dpo", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert first_eval(out)["eval_rewards/accuracies"] == 0  # rewards are all 0 at the start
    assert manifest["eval_reward_accuracy"] > 0.9


def test_gradient_accumulation_gives_the_same_step(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(8))
    results = []
    for batch, accum in ((4, 1), (1, 4), (2, 2)):
        cfg = dpo_recipe(tmp_path, tiny_llama, pairs).resolve(
            "dpo",
            [
                "train.optim=sgd",
                "train.lr=1.0",
                "train.max_grad_norm=0",
                "train.max_steps=1",
                "data.max_rows=4",
                f"train.batch_size={batch}",
                f"train.grad_accum={accum}",
            ],
        )
        out = run_dpo(cfg, tmp_path / f"b{batch}x{accum}", recipe_name="tiny")
        results.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(other[key], results[0][key], atol=1e-6, rtol=1e-5)
    assert all(v.abs().sum() > 0 for k, v in results[0].items() if "lora_B" in k)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_stages_under_torchrun_ddp_shard_pairs_and_equal_one_process(
    tmp_path, tiny_llama, monkeypatch, kind
):
    """2 processes x 2 pairs (gloo) equal 1 process x 4 pairs, for DPO (precomputed reference) and KTO (pairs
    read as answers; its reference point z0 is gathered over the ranks): different rows on each rank, the
    same global batch, the same adapter and losses (tolerance argued in test_sft_stage)."""
    from test_sft_stage import DDP_EXACT, assert_ddp_matches_one_process, record_rows_here, torchrun_recorded

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(8))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_llama, str(pairs), stages={kind: {}})
    _, ddp_rows = torchrun_recorded(
        tmp_path, kind, "--recipe", recipe, *DDP_EXACT, "train.batch_size=2", "--output-dir", tmp_path / "ddp"
    )
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["steps"] == 2
    record_rows_here(monkeypatch, tmp_path / "one-rows")
    cfg = load_recipe(recipe).resolve(kind, DDP_EXACT + ["train.batch_size=4"])
    if kind == "dpo":
        run_dpo(cfg, tmp_path / "one", recipe_name="tiny")
    else:
        from align.stages.kto import run_kto

        run_kto(cfg, tmp_path / "one", recipe_name="tiny")
    # DPO: a step's rows are its pairs, one row each [prompt, chosen, rejected] (2 a rank); KTO: answers and
    # their mismatched partners (batch_size answers, each with its KL row: 4 a rank)
    assert_ddp_matches_one_process(
        ddp_rows, tmp_path / "one-rows", tmp_path / "ddp", tmp_path / "one", per_rank=2 if kind == "dpo" else 4, steps=2
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rows_give_every_answer_its_two_row_logprobs(tiny_model_dir, tokenizer, attention):
    """The answers' summed logprobs and token counts from one row a pair equal two rows' (rows of unequal
    length, a one-token prompt, an empty answer), with gradients; the model runs fewer tokens."""
    from transformers import AutoModelForCausalLM

    from align.stages.preference import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    generator = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(10, len(tokenizer), (n,), generator=generator).tolist()  # noqa: E731
    rows = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
        for p, c, r in ((7, 3, 9), (1, 5, 2), (11, 4, 0), (3, 6, 6))
    ]
    shared, two = SharedPromptCollator(tokenizer.pad_token_id)(rows), PairCollator(tokenizer.pad_token_id)(rows)
    assert shared["input_ids"].numel() < two["input_ids"].numel()

    def sums_and_grads(batch):
        model.zero_grad()
        sums, counts = completion_logps(model, batch)
        (sums * torch.linspace(1, 2, len(sums))).sum().backward()
        return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, our_counts, our_grads = sums_and_grads(shared)
    expected, expected_counts, expected_grads = sums_and_grads(two)
    assert our_counts.tolist() == expected_counts.tolist() == [3, 5, 4, 6, 9, 2, 0, 6]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    assert ours[6] == 0 and (ours.abs() > 1).sum() == 7  # the empty answer scores nothing, the others something
    for name, grad in expected_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_only_for_models_whose_layers_all_attend_through_the_mask(tiny_llama, tiny_gpt2):
    """One row a pair is right only where every layer mixes tokens through the attention mask: not for
    sliding-window or recurrent/convolutional layers (they would see across the answers), flash attention
    (no custom mask) or classes from outside transformers."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config

    from align.models.attention import shared_prompt_obstacle

    sizes = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    assert shared_prompt_obstacle(load_tiny(tiny_llama)) == ""  # eager
    assert shared_prompt_obstacle(load_tiny(tiny_gpt2)) == ""
    qwen_like = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **sizes))
    assert shared_prompt_obstacle(peft.get_peft_model(qwen_like, peft.LoraConfig(r=2, target_modules=["q_proj"]))) == ""
    qwen_like.config.layer_types = ["full_attention", "full_attention"]  # Qwen2's default: still fine
    assert shared_prompt_obstacle(qwen_like) == "" and set(Qwen2Config().layer_types) == {"full_attention"}
    for kinds, word in ((["full_attention", "sliding_attention"], "sliding"), (["mamba", "full_attention"], "mamba")):
        qwen_like.config.layer_types = kinds
        assert word in shared_prompt_obstacle(qwen_like)
    mistral = MistralForCausalLM(MistralConfig(num_hidden_layers=1, sliding_window=4096, **sizes))
    assert "sliding window" in shared_prompt_obstacle(mistral)
    mistral.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_obstacle(mistral)

    class Remote(LlamaForCausalLM):  # as trust_remote_code would load it: a class of the model's own module
        pass

    assert "outside transformers" in shared_prompt_obstacle(Remote(LlamaConfig(num_hidden_layers=1, **sizes)))


# ---------------------------------------------------------------- against TRL


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_loss_and_gradients_equal_trl_dpo_trainer(tmp_path, tiny_llama, tokenizer, loss, smoothing):
    import datasets
    import peft
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from align.stages.dpo import PreferenceTrainer

    model = peft.get_peft_model(
        load_tiny(tiny_llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    trl_args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.2,
        loss_type=[loss],
        label_smoothing=smoothing,
        report_to=[],
        use_cpu=True,
    )
    trl = DPOTrainer(
        model=model,
        args=trl_args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tokenizer,
    )
    torch.manual_seed(1)  # move the policy away from the reference (TRL's frozen 'ref' copy has B = 0, as the base)
    for name, param in model.named_parameters():
        if "lora_B" in name and ".default." in name:
            param.data.normal_(0, 0.5)

    pairs, _ = encode_pair_files(
        [str(write_jsonl(tmp_path / "p.jsonl", marker_pairs(3)))], tokenizer, DataConfig(), "train"
    )
    rows = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    ours = PreferenceTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], use_cpu=True),
        options=PreferenceSettings(loss=loss, beta=0.2, label_smoothing=smoothing, reference="live"),
    )

    def loss_and_grads(compute):
        model.train()
        model.zero_grad()
        value = compute()
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    our_loss, our_grads = loss_and_grads(lambda: ours.compute_loss(model, PairCollator(tokenizer.pad_token_id)(rows)))
    trl_loss, trl_grads = loss_and_grads(
        lambda: trl._compute_loss(
            trl.model, DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows), False
        )
    )
    # align's default layout - one row a pair, the prompt run once - gives TRL's loss and gradients too
    shared_loss, shared_grads = loss_and_grads(
        lambda: ours.compute_loss(model, SharedPromptCollator(tokenizer.pad_token_id)(rows))
    )
    assert abs(our_loss.item() - LN2) > 1e-3  # the policy really moved
    assert our_grads.keys() == trl_grads.keys() == shared_grads.keys() and our_grads
    for loss_value, grads in ((our_loss, our_grads), (shared_loss, shared_grads)):
        torch.testing.assert_close(loss_value, trl_loss, atol=1e-5, rtol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sft_on_prompt", [True, False])
def test_orpo_loss_and_gradients_equal_trl_orpo_trainer(tmp_path, tiny_llama, tokenizer, sft_on_prompt):
    """With sft_on_prompt, align's ORPO is TRL's ORPOTrainer: loss and every gradient. Without it (the
    default) the odds-ratio term is TRL's and the SFT term is the NLL of the answer tokens alone."""
    import datasets
    import peft
    from transformers import TrainingArguments
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer

    from align.stages.dpo import PreferenceTrainer
    from align.tokens import IGNORE_INDEX

    torch.manual_seed(0)  # the adapter's A matrices: the same whatever ran before
    model = peft.get_peft_model(
        load_tiny(tiny_llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    trl = ORPOTrainer(
        model=model,
        args=TRLORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, report_to=[], use_cpu=True),
        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tokenizer,
    )
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)

    rows = marker_pairs(3)
    rows[1]["chosen"] += " and then it rained for a very long time"  # answers of different lengths
    pairs, _ = encode_pair_files([str(write_jsonl(tmp_path / "p.jsonl", rows))], tokenizer, DataConfig(), "train")
    ours = PreferenceTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], use_cpu=True),
        options=PreferenceSettings.of(ORPOConfig(orpo=ORPOOptions(beta=0.3, sft_on_prompt=sft_on_prompt))),
    )
    ours_batch = PairCollator(tokenizer.pad_token_id)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    )
    n = len(pairs)
    # TRL's batch: prompt + answer ids per side, the prompt masked in the labels, padded right
    trl_batch = {}
    for side, half in (("chosen", ours_batch["input_ids"][:n]), ("rejected", ours_batch["input_ids"][n:])):
        rows_of = slice(0, n) if side == "chosen" else slice(n, 2 * n)
        trl_batch[f"{side}_input_ids"] = half
        trl_batch[f"{side}_attention_mask"] = ours_batch["attention_mask"][rows_of]
        trl_batch[f"{side}_labels"] = ours_batch["labels"][rows_of]

    def loss_and_grads(compute):
        model.train()
        model.zero_grad()
        value = compute()
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    our_loss, our_grads = loss_and_grads(lambda: ours.compute_loss(model, ours_batch))
    if sft_on_prompt:
        trl_loss, trl_grads = loss_and_grads(lambda: trl.get_batch_loss_metrics(model, trl_batch)[0])
    else:

        def trl_with_answer_nll():  # TRL's odds-ratio term (its metrics' nll_loss is a float, no gradient)
            chosen_logps, rejected_logps = trl.concatenated_forward(model, trl_batch)[:2]
            odds_ratio_term = trl.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
            logits = model(
                input_ids=trl_batch["chosen_input_ids"], attention_mask=trl_batch["chosen_attention_mask"]
            ).logits
            labels = trl_batch["chosen_labels"][:, 1:]
            answer_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
            )
            return answer_nll - odds_ratio_term

        trl_loss, trl_grads = loss_and_grads(trl_with_answer_nll)
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4)


def test_orpo_stage_learns_the_toy_preference_from_the_base(tmp_path, tiny_llama):
    """`align orpo` from the base: the chosen answers' likelihood rises (the SFT half) and the held-out
    odds ratio prefers them (the preference half); its metrics carry TRL's names."""
    train = write_jsonl(tmp_path / "train.jsonl", marker_pairs(48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", marker_pairs(16, start=100))
    recipe = load_recipe(
        tiny_recipe(tmp_path / "r.yaml", tiny_llama, str(train), stages={"orpo": {"data": {"eval": str(held_out)}}})
    )
    cfg = recipe.resolve(
        "orpo", ["train.max_steps=30", "train.batch_size=4", "train.lr=5e-3", "lora.r=8", "orpo.beta=0.5"]
    )
    assert cfg.kind == "orpo"
    out = run_dpo(cfg, tmp_path / "orpo", recipe_name="tiny")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["eval_nll_loss"] < start["eval_nll_loss"] - 0.1  # 10.82 -> 10.51 measured
    assert end["eval_log_odds_chosen"] > start["eval_log_odds_chosen"] and end["eval_rewards/accuracies"] > 0.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "orpo" and manifest["loss"] == "orpo" and manifest["status"] == "complete"


def test_cli_dpo_end_to_end(tmp_path, tiny_gpt2):
    from test_sft_stage import cli

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(10))
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_gpt2, str(pairs), stages={"dpo": {"data": {"eval_rows": 2}}})
    proc = cli("dpo", "--recipe", recipe, "train.max_steps=2", "dpo.loss=simpo", "--output-dir", tmp_path / "out")
    assert "reference-free" in " ".join(proc.stdout.split())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["loss"] == "simpo"


def test_reference_context_equals_a_freshly_loaded_base_and_restores_the_adapter(tiny_llama, tokenizer):
    """RELIABILITY 19: inside reference_mode the logprobs are the base model's, exactly in fp32."""
    import peft

    from align.models.adapters import reference_mode
    from align.stages.dpo import completion_logps

    model = peft.get_peft_model(
        load_tiny(tiny_llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.train()  # dropout on: the reference must still be deterministic
    pairs, _ = encode_pair_files([str(write_jsonl_tmp(marker_pairs(3)))], tokenizer, DataConfig(), "train")
    batch = PairCollator(tokenizer.pad_token_id)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]
    )
    with torch.no_grad():
        with reference_mode(model, None):
            inside, _ = completion_logps(model, batch)
        # frozen as a reference is, so both read the output layer the same way (its bypass; see output_layer)
        fresh, _ = completion_logps(load_tiny(tiny_llama).requires_grad_(False), batch)
        assert torch.equal(inside, fresh)
        assert model.training  # mode restored
        model.eval()
        after, _ = completion_logps(model, batch)
    assert not torch.allclose(after, fresh, atol=1e-3)  # the adapter is active again


def write_jsonl_tmp(rows):
    import tempfile
    from pathlib import Path

    return write_jsonl(Path(tempfile.mkdtemp()) / "rows.jsonl", rows)


def test_dpo_resume_equals_uninterrupted(tmp_path, tiny_gpt2):
    import shutil

    from safetensors.torch import load_file

    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(16))
    overrides = ["train.max_steps=4", "train.save_steps=2", "train.save_total_limit=3"]
    recipe = dpo_recipe(tmp_path, tiny_gpt2, pairs)
    full = run_dpo(recipe.resolve("dpo", overrides), tmp_path / "full", recipe_name="tiny")
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for name in ("adapter", "manifest.json", "loss.png", "checkpoints/checkpoint-4"):
        target = killed / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_dpo(recipe.resolve("dpo", overrides), killed, recipe_name="tiny", resume=True)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward"])
def test_an_evaluation_at_the_last_step_is_the_final_one(tmp_path, tiny_llama, kind, monkeypatch):
    """With eval_steps dividing max_steps, the held-out metrics the manifest keeps are the last step's
    evaluation: the same weights on the same rows are not evaluated twice (common.final_evaluation)."""
    from transformers import Trainer

    from align.stages.reward import run_reward

    calls = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(
        Trainer, "evaluate", lambda self, *a, **k: calls.append(self.state.global_step) or evaluate(self, *a, **k)
    )
    data = FIXTURES / "gsm8k-40.jsonl" if kind == "sft" else write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(16))
    run = {"sft": run_sft, "dpo": run_dpo, "reward": run_reward}[kind]
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_llama, str(data), stages={kind: {}}))
    cfg = recipe.resolve(kind, ["data.eval_rows=4", "train.max_steps=2", "train.eval_steps=2"])
    out = run(cfg, tmp_path / kind, recipe_name="tiny")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["step"] for r in evals] == [0, 2] and calls == [0, 2]  # before: a third, again at step 2
    final = manifest["held_out"]["loss"] if kind == "reward" else manifest["eval_loss"]
    assert final == evals[-1]["eval_loss"]
    if kind == "dpo":
        assert manifest["eval_reward_accuracy"] == evals[-1]["eval_rewards/accuracies"]
