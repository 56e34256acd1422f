"""Every adapter method the recipe offers builds through peft and trains; LoRA+ gives B its own rate."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from align.config import AdapterConfig, LoraConfig
from align.models.adapters import add_adapter

METHODS = [
    ("lora", {}, {}),
    ("lora", {"use_dora": True}, {}),
    ("lora", {"use_rslora": True}, {}),
    (
        "ia3",
        {},
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "options": {"feedforward_modules": ["down_proj"]}},
    ),
    ("vera", {}, {"target_modules": ["q_proj", "v_proj"]}),
    ("loha", {}, {}),
    ("lokr", {}, {}),
    ("oft", {}, {}),
    ("adalora", {}, {}),
    ("full", {}, {}),
]


@pytest.mark.parametrize(
    "method, lora, adapter", METHODS, ids=[f"{m}{'-' + next(iter(lo)) if lo else ''}" for m, lo, _ in METHODS]
)
def test_each_method_builds_and_its_weights_train(tiny_llama, method, lora, adapter):
    torch.manual_seed(0)
    model = add_adapter(
        load_tiny(tiny_llama),
        AdapterConfig(method=method, **adapter),
        LoraConfig(r=4, alpha=8, dropout=0.0, **lora),
        quantized=False,
        gradient_checkpointing=False,
    )
    model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    assert trainable
    if method != "full":
        assert sum(p.numel() for p in trainable.values()) < total / 2
        assert type(model).__name__.startswith("Peft")
    ids = torch.randint(10, 1000, (2, 12))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # two steps: zero-initialised halves (LoRA B) move first, the rest next
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])]
    assert not unchanged, f"{len(unchanged)} of {len(trainable)} trainable tensors did not train: {unchanged[:4]}"


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tiny_llama):
    from align.config import SFTConfig
    from align.stages.common import loraplus_optimizer

    cfg = SFTConfig(lora={"r": 4, "loraplus_lr_ratio": 16}, train={"lr": 1e-4})
    model = add_adapter(load_tiny(tiny_llama), cfg.adapter, cfg.lora, quantized=False, gradient_checkpointing=False)
    optimizer = loraplus_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["lr"]
    assert {lr for n, lr in rates.items() if "lora_A" in n} == {1e-4}
    b_rates = [lr for n, lr in rates.items() if "lora_B" in n]
    assert b_rates and all(lr == pytest.approx(16e-4) for lr in b_rates)


def test_qlora_gradients_are_unchanged_by_an_eval_pass(tiny_llama):
    """bitsandbytes 0.50 repacks 4-bit weights for fast CPU inference on the first no-grad eval
    forward and keeps using that layout, which has no autograd kernel, once training resumes: the
    gradient through the frozen base silently goes wrong. Evaluating mid-training must not change
    the gradients of the next step."""
    from align.config import ModelConfig, QuantizationConfig
    from align.models.loading import load_base_model

    torch.manual_seed(0)
    model = load_base_model(
        ModelConfig(name=str(tiny_llama), attn_implementation="eager"), QuantizationConfig(mode="nf4"), "fp32"
    )
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("the repacking bug needs an AVX512-BF16 CPU")
    model = add_adapter(
        model, AdapterConfig(), LoraConfig(r=4, alpha=8, dropout=0.0), quantized=True, gradient_checkpointing=False
    )
    ids = torch.randint(10, 1000, (2, 12))

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_grads()
    assert any(g.abs().sum() > 0 for g in before.values())
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("share, recomputed", [(False, []), (0.5, [1, 3]), (0.75, [1, 2, 3]), (True, [0, 1, 2, 3])])
def test_a_share_of_layers_is_checkpointed_and_gradients_do_not_change(tiny_llama, share, recomputed):
    """train.gradient_checkpointing: a share of the decoder layers recompute their forward in backward
    (evenly spread), and the gradients are those of no checkpointing."""
    from transformers import AutoModelForCausalLM

    def build(checkpointing):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, num_hidden_layers=4)
        model = add_adapter(base, AdapterConfig(), LoraConfig(dropout=0.0), False, checkpointing, 10)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        return model.train()

    model, plain = build(share), build(False)
    layers = model.get_base_model().model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # a pre-hook: the recomputation stops early, once the last tensor backward needs is made again
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 1000, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert [i for i, n in enumerate(calls) if n == 2] == recomputed  # forward again in backward
    assert all(n in (1, 2) for n in calls)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_model_without_gradient_checkpointing_trains_without_it(tiny_llama, monkeypatch, capsys):
    """Checkpointing is on by default; a model that cannot do it (some remote-code models) trains without
    it and says so, instead of failing in transformers' gradient_checkpointing_enable."""
    from align.models.adapters import checkpoint_layers

    model = load_tiny(tiny_llama)
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    checkpoint_layers(model, True)
    assert not model.is_gradient_checkpointing
    assert "does not support gradient checkpointing" in capsys.readouterr().out


def test_a_merged_sync_sends_a_tied_output_layer_when_its_embedding_trains(tiny_llama):
    """base_weights(adapted_only=True) leaves out frozen weights - but an engine keeps its own untied copy of
    a tied output layer, so a trainable embedding must also be sent as lm_head.weight."""
    from align.models.trained import base_weights

    model = add_adapter(load_tiny(tiny_llama), AdapterConfig(), LoraConfig(r=4, alpha=8), False, False)
    assert model.get_base_model().config.tie_word_embeddings
    sent = lambda: {n for n, _ in base_weights(model, untie=True, merge_adapter=True, adapted_only=True)}  # noqa: E731
    assert "lm_head.weight" not in sent() and "model.embed_tokens.weight" not in sent()
    model.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= sent()


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_merged_weights_equal_peft_merge_and_unload(tiny_model_dir, lora):
    """base_weights(merge_adapter=True) - one addmm a layer for plain linear adapters, peft's delta for
    GPT-2's fan-in-fan-out Conv1D - gives the weights peft's own merge gives, for every adapted layer."""
    from align.models.trained import base_weights, lora_layers

    model = add_adapter(load_tiny(tiny_model_dir), AdapterConfig(), LoraConfig(r=4, alpha=8, **lora), False, False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # peft starts B at zero: a merge of zeros would prove nothing
    unmerged = {name: weight.clone() for name, weight in base_weights(model)}  # merge_and_unload writes in place
    ours = {name: weight.clone() for name, weight in base_weights(model, merge_adapter=True)}
    for name, weight in base_weights(model):  # merging gave new tensors: the model's own fp32 weights are untouched
        assert torch.equal(weight, unmerged[name]), name
    adapted = lora_layers(model)
    assert adapted and all(name in ours for name in adapted)
    expected = model.merge_and_unload().state_dict()
    for name in adapted:
        assert (ours[name] - unmerged[name]).abs().max() > 1e-3  # the adapter's delta is in it
        torch.testing.assert_close(ours[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_an_embedding_adapter_is_merged_into_the_embedding_and_its_tied_output_layer(tiny_llama):
    """A LoRA on embed_tokens (peft keeps it in lora_embedding_A/B, not lora_A/B) is merged like any other
    and a merged sync sends it (it was once left out: the engine kept the base embedding). The engine's
    untied copy of the tied output layer stays the base embedding, which is what the trainer's output
    layer reads (peft's merge_and_unload would add the delta to both)."""
    from align.models.trained import base_weights, lora_layers

    targets = AdapterConfig(target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = add_adapter(load_tiny(tiny_llama), targets, LoraConfig(r=4, alpha=8), False, False)
    assert model.get_base_model().config.tie_word_embeddings
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # peft starts an embedding's A at zero, not its B
                param.normal_(0, 0.5)
    assert "model.embed_tokens.weight" in lora_layers(model)
    ours = dict(base_weights(model, untie=True, merge_adapter=True))
    sent = {n for n, _ in base_weights(model, untie=True, merge_adapter=True, adapted_only=True)}
    unmerged = dict(base_weights(model))["model.embed_tokens.weight"].clone()
    assert torch.equal(ours["lm_head.weight"], unmerged)  # the output layer reads the base embedding
    assert "model.embed_tokens.weight" in sent and "lm_head.weight" not in sent
    expected = model.merge_and_unload().state_dict()["model.embed_tokens.weight"]  # merges in place
    assert (ours["model.embed_tokens.weight"] - unmerged).abs().max() > 1e-3
    torch.testing.assert_close(ours["model.embed_tokens.weight"], expected, atol=1e-6, rtol=1e-5)


def test_an_adapter_with_lora_bias_is_not_merged_silently(tiny_llama):
    """peft's lora_bias trains a bias on lora_B that an engine's merged weights have no place for (Llama's
    projections have no bias): merging refuses it, and a vLLM engine says to use hf, rather than serve a policy
    without it."""
    from align.models.trained import base_weights
    from align.rollout.verify import served_lora

    adapter = AdapterConfig(target_modules=["q_proj", "v_proj"], options={"lora_bias": True})
    model = add_adapter(load_tiny(tiny_llama), adapter, LoraConfig(r=4, alpha=8), False, False)
    with pytest.raises(ValueError, match="lora_bias.*engine hf"):
        served_lora(model)
    with pytest.raises(ValueError, match="lora_bias"):
        dict(base_weights(model, merge_adapter=True))


def test_under_fsdp_the_4bit_base_is_stored_in_the_compute_dtype_and_computes_the_same(tiny_llama, monkeypatch):
    """FSDP flattens a layer's parameters into one tensor of one dtype: QLoRA's packed 4-bit weights must be
    stored as the compute dtype to be sharded with the norms and the adapter (FSDP-QLoRA). The storage is a
    view of the same 4-bit codes: the logits are unchanged."""
    from align.config import ModelConfig, QuantizationConfig
    from align.models.loading import load_base_model

    model_cfg, nf4 = ModelConfig(name=str(tiny_llama), attn_implementation="eager"), QuantizationConfig(mode="nf4")
    ids = torch.randint(10, 1000, (2, 12))
    logits = {}
    for fsdp in ("false", "true"):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", fsdp)
        model = load_base_model(model_cfg, nf4, "bf16")
        packed = {p.dtype for n, p in model.named_parameters() if "proj" in n}
        assert packed == ({torch.bfloat16} if fsdp == "true" else {torch.uint8}), packed
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16} or fsdp == "false"
        with torch.no_grad():
            logits[fsdp] = model(input_ids=ids).logits.float()
    torch.testing.assert_close(logits["true"], logits["false"], atol=0, rtol=0)


def test_set_training_sets_every_flag_train_would_without_calling_it(tiny_llama, monkeypatch):
    """The fast switch (align/models/modes.py) skips ``train``'s recursion: for a peft model over a transformers
    model every module ends in the mode ``model.train`` gives, and no ``train`` runs at all."""
    from align.models.modes import evaluating, set_training

    model = add_adapter(load_tiny(tiny_llama), AdapterConfig(), LoraConfig(r=4, alpha=8, dropout=0.1), False, False)
    modules = list(model.modules())
    for mode in (False, True):
        model.train(not mode)
        with monkeypatch.context() as patched:
            patched.setattr(torch.nn.Module, "train", lambda *_: pytest.fail("train was called"))
            set_training(model, mode)
        assert [m.training for m in modules] == [mode] * len(modules)
    model.train()
    with evaluating(model):
        assert not any(m.training for m in modules)
    assert all(m.training for m in modules)


def test_a_module_whose_train_does_more_is_switched_by_train_itself():
    from align.models.modes import evaluating

    class Counting(torch.nn.Linear):
        calls = 0

        def train(self, mode=True):
            Counting.calls += 1
            return super().train(mode)

    class Wrapper(torch.nn.Module):  # ``training`` a property whose setter does more (torch.nn.cpp.ModuleWrapper)
        @property
        def training(self):
            return self.__dict__.get("mode", True)

        @training.setter
        def training(self, mode):
            self.__dict__["mode"] = mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(Counting(2, 2)))
    with evaluating(model):
        assert not any(m.training for m in model.modules()) and Counting.calls == 1
    assert all(m.training for m in model.modules()) and Counting.calls == 2
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Wrapper())
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
