"""The transformers rollout engine, the stop rules every engine shares, and trainer-side rescoring."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from align.data.templating import encode_conversation, encode_prompt
from align.rollout.engine import Rollout, Sampling, finish, stop_token_ids
from align.rollout.engines import pick_engine
from align.rollout.hf import HFEngine, filter_logits
from align.rollout.scoring import logprob_mismatch, rollout_batch, score_rollouts

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour you like and say why, please."},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story about a cat."},
    ],
]


def test_finish_cuts_at_end_of_turn_then_stop_string_then_length(tokenizer):
    eos = tokenizer.eos_token_id
    words = tokenizer("one two. three", add_special_tokens=False)["input_ids"]
    ids, logps, reason, text = finish(tokenizer, words + [eos, 5, 6], [-1.0] * (len(words) + 3), {eos}, ())
    assert (ids, reason, text) == (words + [eos], "stop", "one two. three") and len(logps) == len(ids)
    ids, logps, reason, text = finish(tokenizer, words, [-1.0] * len(words), {eos}, (".",))
    assert reason == "stop" and text == "one two" and tokenizer.decode(ids).endswith(".") and len(logps) == len(ids)
    assert not tokenizer.decode(ids[:-1]).count(".")  # the shortest prefix holding the stop string
    ids, _, reason, text = finish(tokenizer, words, [-1.0] * len(words), {eos}, ("nowhere",))
    assert (ids, reason, text) == (words, "length", "one two. three")


def test_stop_ids_include_the_generation_configs_eos(tiny_llama, tokenizer):
    model = load_tiny(tiny_llama)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert {tokenizer.eos_token_id, 7} <= stop_token_ids(tokenizer, model)


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.8: 0.5 + 0.3 reach it, the tail goes
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.1)).tolist() == [
        [False, True, True, True]
    ]  # the top token always stays


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_sampler_logprobs_equal_the_trainers_at_every_temperature(tiny_model_dir, tokenizer, temperature):
    """RELIABILITY 15: what the engine reports is what the trainer recomputes (left-padded prompts, GPT-2 positions)."""
    model = load_tiny(tiny_model_dir)
    rollouts = HFEngine(model, tokenizer, batch_size=4).generate(
        CHATS, Sampling(n=2, temperature=temperature, max_new_tokens=12, seed=3)
    )
    trainer = score_rollouts(model, rollouts, tokenizer.pad_token_id, temperature)
    assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-4
    assert all(len(r.logprobs) == len(r.completion_ids) > 0 for r in rollouts)


def test_greedy_logprobs_are_plain_log_softmax_and_top_k_1_is_greedy(tiny_llama, tokenizer):
    model = load_tiny(tiny_llama)
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(CHATS, Sampling(temperature=0, max_new_tokens=10))
    top1 = engine.generate(CHATS, Sampling(temperature=1.3, top_k=1, max_new_tokens=10, seed=9))
    assert [r.completion_ids for r in greedy] == [r.completion_ids for r in top1]
    assert all(abs(lp) < 1e-6 for r in top1 for lp in r.logprobs)  # one token left: probability 1
    trainer = score_rollouts(model, greedy, tokenizer.pad_token_id, temperature=0)
    assert logprob_mismatch([r.logprobs for r in greedy], trainer)["logprob_mismatch_max"] < 1e-4


def test_prompt_ids_are_the_training_prompt_ids(tiny_llama, tokenizer):
    """RELIABILITY 3: the engine samples after exactly the ids the trainer scores."""
    rollouts = HFEngine(load_tiny(tiny_llama), tokenizer).generate(CHATS, Sampling(n=2, max_new_tokens=4))
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    for r in rollouts:
        chat = CHATS[r.prompt_index]
        assert r.prompt_ids == encode_prompt(tokenizer, chat)
        trained = encode_conversation(tokenizer, chat + [{"role": "assistant", "content": "ok"}], max_length=512)
        assert trained.input_ids[: len(r.prompt_ids)] == r.prompt_ids


def test_sampling_is_seeded(tiny_llama, tokenizer):
    engine = HFEngine(load_tiny(tiny_llama), tokenizer)
    run = lambda seed: [r.completion_ids for r in engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=seed))]  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_max_new_tokens_truncates_and_says_so(tiny_llama, tokenizer):
    rollouts = HFEngine(load_tiny(tiny_llama), tokenizer).generate(CHATS, Sampling(max_new_tokens=2, seed=0))
    assert all(r.truncated and len(r.completion_ids) == 2 for r in rollouts)


def test_generation_leaves_training_mode_as_it_was(tiny_llama, tokenizer):
    model = load_tiny(tiny_llama)
    model.train()
    HFEngine(model, tokenizer).generate(CHATS[:1], Sampling(max_new_tokens=2))
    assert model.training


def test_rescoring_alone_equals_left_and_right_padded_batches(tiny_model_dir, tokenizer):
    """RELIABILITY 5 for the RL side: per-token logprobs do not depend on the batch around them."""
    model = load_tiny(tiny_model_dir)
    rollouts = HFEngine(model, tokenizer).generate(CHATS, Sampling(n=2, max_new_tokens=9, seed=5))
    together = score_rollouts(model, rollouts, tokenizer.pad_token_id, 1.0, batch_size=len(rollouts))
    alone = score_rollouts(model, rollouts, tokenizer.pad_token_id, 1.0, batch_size=1)
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5)
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    assert batch["completion_mask"].sum().item() == sum(len(r.completion_ids) for r in rollouts)


def test_rescoring_and_the_rl_losses_read_one_trainer_logprob_function(tiny_llama, tokenizer, monkeypatch):
    """Issue 14: the vLLM sync probe (score_rollouts) and the RL losses (policy_outputs) read the
    trainer's logprobs through one function, so the probe verifies what the losses use; and they
    equal the hf sampler's own logprobs at the sampling temperature."""
    import align.rollout.scoring as scoring

    model = load_tiny(tiny_llama)
    rollouts = HFEngine(model, tokenizer).generate(CHATS, Sampling(n=2, temperature=0.7, max_new_tokens=9, seed=3))
    calls = []
    real = scoring.policy_outputs
    monkeypatch.setattr(scoring, "policy_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    rescored = score_rollouts(model, rollouts, tokenizer.pad_token_id, 0.7)
    assert calls, "score_rollouts must read the logprobs through policy_outputs"
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _, _ = real(model, batch, 0.7)
    for row, rollout, again in zip(logps, rollouts, rescored):
        assert row[: len(rollout.completion_ids)].tolist() == pytest.approx(again, abs=1e-6)
        assert row[: len(rollout.completion_ids)].tolist() == pytest.approx(rollout.logprobs, abs=1e-4)


def test_qlora_policy_generates_and_its_logprobs_match(tiny_llama, tokenizer):
    from align.config import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model

    base = load_base_model(
        ModelConfig(name=str(tiny_llama), attn_implementation="eager"), QuantizationConfig(mode="nf4"), "fp32"
    )
    policy = add_adapter(base, AdapterConfig(), LoraConfig(dropout=0.0), quantized=True, gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    policy.train()
    rollouts = HFEngine(policy, tokenizer).generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=1))
    trainer = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0)
    assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-4
    with policy.disable_adapter():
        base_scores = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0)
    assert logprob_mismatch(base_scores, trainer)["logprob_mismatch_max"] > 1e-3  # the adapter is in the samples


def test_engine_choice(monkeypatch):
    import align.rollout.engines as engine

    monkeypatch.setattr(engine, "vllm_available", lambda: False)
    assert pick_engine("auto") == "hf"
    with pytest.raises(RuntimeError, match="not installed"):
        pick_engine("vllm")
    monkeypatch.setattr(engine, "vllm_available", lambda: True)
    assert pick_engine("auto") == "vllm"
    with pytest.raises(ValueError):
        pick_engine("sglang")


def test_rollout_record_fields():
    r = Rollout(0, [1, 2], [3], [-0.5], "length", "x")
    assert r.truncated and r.engine_version == 0
    with pytest.raises(ValueError):
        Sampling(top_p=0)


def test_generate_and_chat_commands_with_the_hf_engine(tiny_llama):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *args, **kw: subprocess.run(
        [sys.executable, "-m", "align.cli", *map(str, args)], capture_output=True, text=True, env=env, **kw
    )  # noqa: E731
    gen = run(
        "generate",
        "-m",
        tiny_llama,
        "-p",
        "What is 2+2?",
        "-p",
        "Hi",
        "-n",
        "2",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "3",
        "--engine",
        "hf",
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count("assistant:") == 4 and "cut at max_new_tokens" in gen.stdout and "engine: hf" in gen.stdout
    chat = run(
        "chat", "-m", tiny_llama, "--max-new-tokens", "3", "--engine", "hf", input="hello\n/reset\nagain\n/exit\n"
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant:") == 2


def test_cpu_kv_cache_is_sized_to_the_stages_largest_generate_call(tiny_llama):
    from align.rollout.vllm import cpu_kv_cache_bytes

    policy = load_tiny(tiny_llama)  # 2 layers x 2 KV heads x head_dim 8: K and V of a 128-token block, fp32
    block = 2 * 2 * 2 * 8 * 4 * 128
    assert block == 32768
    # 32 sequences of 300 tokens: 3 blocks each, 96 blocks, + vLLM's null block + 1 spare
    assert cpu_kv_cache_bytes(policy, torch.float32, 512, None, (32, 300)) == 98 * block
    assert cpu_kv_cache_bytes(policy, torch.bfloat16, 512, None, (32, 300)) == 98 * block // 2
    # a larger call: KV_MAX_SEQUENCES (64) at once, vLLM queues the rest
    assert cpu_kv_cache_bytes(policy, torch.float32, 512, None, (128, 300)) == (64 * 3 + 2) * block
    # never less than one max_model_len sequence (vLLM refuses to start without it): 512 / 128 + 2 blocks
    assert cpu_kv_cache_bytes(policy, torch.float32, 512, None, (1, 10)) == 6 * block
    assert cpu_kv_cache_bytes(policy, torch.float32, 512, 1.5, (32, 100)) == int(1.5 * 2**30)  # the recipe's GiB
    assert cpu_kv_cache_bytes(policy, torch.float32, 512, None, None) == 2 * 2**30  # no workload known: 2 GiB


def test_export_base_writes_what_a_qlora_trainer_computes_with_and_never_overwrites(tmp_path, vllm_llama):
    """`align models export-base`: the folder a vLLM server must serve for rollout.engine server. For a QLoRA
    stage that is the NF4 base dequantized: its logits equal the 4-bit base's, not the original checkpoint's."""
    from conftest import tiny_recipe, write_jsonl
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from align.cli import app
    from align.models.loading import load_base_model

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}])
    stage = {"reward": {"type": "rule", "name": "contains_marker", "marker": "yes"}}
    recipe = tiny_recipe(
        tmp_path / "r.yaml", vllm_llama, str(data), quantization={"mode": "nf4"}, lora={"r": 12}, stages={"grpo": stage}
    )
    out = tmp_path / "served"
    result = CliRunner().invoke(
        app, ["models", "export-base", str(recipe), "grpo", "-o", str(out), "--precision", "fp32"]
    )
    assert result.exit_code == 0, result.output
    assert "--dtype float32 --enable-lora --max-lora-rank 16 --logprobs-mode processed_logprobs" in result.output
    from align.recipe import load_recipe

    cfg = load_recipe(recipe).resolve("grpo")
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        nf4 = load_base_model(cfg.model, cfg.quantization, "fp32", vllm_llama)(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32)(ids).logits
    assert (exported - nf4).abs().max() < 1e-4 < (original - nf4).abs().max()
    again = CliRunner().invoke(app, ["models", "export-base", str(recipe), "grpo", "-o", str(out)])
    assert again.exit_code != 0 and "not empty" in str(again.exception) + again.output
