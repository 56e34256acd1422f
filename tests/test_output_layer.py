"""Log-probs from the bypassed output layer (only the scored positions' logits, a chunk at a time)
equal the ones from the model's full logits: values, entropies and gradients, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny
from torch.utils._python_dispatch import TorchDispatchMode

from align.config import AdapterConfig, LoraConfig
from align.losses import linear_token_logps, token_logps
from align.models.adapters import add_adapter
from align.models.loading import autocast
from align.models.output_layer import final_hidden, next_token_logps, output_layer
from align.stages.sft import LabelledTokenTrainer
from align.tokens import IGNORE_INDEX


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logps_equal_the_full_log_softmax_with_gradients(temperature):
    torch.manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, requires_grad=True)
    weight, bias, targets = torch.randn(v, h) * 0.3, torch.randn(v) * 0.1, torch.randint(0, v, (n,))
    upstream = torch.randn(n)  # a loss that weighs positions differently, as DPO's does

    logps, entropy = linear_token_logps(hidden, weight, targets, temperature, bias, entropy=True, chunk=5)
    (logps * upstream).sum().backward()
    grad, hidden.grad = hidden.grad.clone(), None

    logits = hidden @ weight.T + bias
    expected = token_logps(logits.unsqueeze(0), targets.unsqueeze(0), temperature)[0]
    (expected * upstream).sum().backward()
    scaled = logits.detach() / temperature
    expected_entropy = -(scaled.softmax(-1) * scaled.log_softmax(-1)).sum(-1)

    torch.testing.assert_close(logps, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, grad, atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="frozen"):
        linear_token_logps(hidden, weight.requires_grad_(), targets)


def lora_model(folder):
    model = load_tiny(folder)
    model = add_adapter(model, AdapterConfig(), LoraConfig(dropout=0.0), False, False, 10)
    for name, p in model.named_parameters():  # LoRA's B starts at 0; move it so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def scored_batch(targets_from: int = 4):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    targets = ids[:, targets_from:].clone()
    targets[1, 6:] = IGNORE_INDEX  # a short row
    targets[2, :2] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=mask), targets


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_next_token_logps_equal_the_models_logits_path(tiny_model_dir, monkeypatch, precision):
    model = lora_model(tiny_model_dir)
    layer = output_layer(model)
    assert layer is model.get_output_embeddings()  # frozen plain Linear: bypassed
    inputs, targets = scored_batch()
    upstream = torch.randn(targets.shape)
    results, made = {}, []
    layer.register_forward_hook(lambda _m, _a, out: made.append(out.shape[1]))  # logit positions made
    for full in ("0", "1"):
        monkeypatch.setenv("ALIGN_FULL_LOGITS", full)
        model.zero_grad()
        with autocast(precision):
            logps, entropy, hidden = next_token_logps(model, targets, 0.7, entropy=True, hidden=True, **inputs)
        (logps * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[full] = logps.detach(), entropy, hidden.detach(), grads
    assert "forward" not in layer.__dict__  # the bypass is gone after the call
    assert made == [0, targets.shape[1] + 1]  # bypassed: no logits from the layer; full: every kept position
    tol = dict(atol=1e-5, rtol=1e-4) if precision == "fp32" else dict(atol=2e-2, rtol=2e-2)
    (logps, entropy, hidden, grads), (logps_full, entropy_full, hidden_full, grads_full) = results["0"], results["1"]
    assert (logps[targets == IGNORE_INDEX] == 0).all() and (logps[targets != IGNORE_INDEX] < 0).all()
    torch.testing.assert_close(logps, logps_full, **tol)
    torch.testing.assert_close(entropy, entropy_full, **tol)
    torch.testing.assert_close(hidden, hidden_full, **tol)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_full[name], **tol, msg=name)


class WeightCasts(TorchDispatchMode):
    """Counts the copies made of one tensor in another dtype (autocast's casts included)."""

    def __init__(self, weight):
        super().__init__()
        self.shape, self.casts = weight.shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            self.casts += any(isinstance(a, torch.Tensor) and a.shape == self.shape for a in args[:2])
        return func(*args, **(kwargs or {}))


def test_the_output_layer_is_cast_once_per_forward_under_autocast(tiny_model_dir, monkeypatch):
    """autocast re-casts a frozen weight at every use: the bypassed layer (fed no positions) cast the whole
    fp32 output layer for nothing, and each chunk cast it twice more (SmolLM2: 20 ms a cast; issue 16)."""
    model = lora_model(tiny_model_dir)
    layer = output_layer(model)
    assert layer.weight.dtype == torch.float32
    monkeypatch.setattr("align.losses.CHUNK_BYTES", 4 * layer.weight.shape[0] * 3)  # 3 positions a chunk
    inputs, targets = scored_batch()
    assert (targets != IGNORE_INDEX).sum() > 3 * 3  # several chunks
    with autocast("bf16"), WeightCasts(layer.weight) as counted:
        logps = next_token_logps(model, targets, **inputs)[0]
        logps.sum().backward()
    assert counted.casts == 1


def test_the_bypass_puts_back_a_forward_set_on_the_layer_and_its_empty_logits_stay_on_the_graph(tiny_llama):
    """accelerate's hooks replace a module's forward on the instance, as the bypass does; and DDP with
    find_unused_parameters searches the graph from the model's outputs, the empty logits among them."""
    model = lora_model(tiny_llama)
    layer = output_layer(model)
    original = layer.forward
    layer.forward = lambda hidden: original(hidden)  # a wrapper, as accelerate's add_hook_to_module sets
    wrapper = layer.forward
    inputs, targets = scored_batch()
    with final_hidden(model, layer) as captured:
        logits = model(**inputs, logits_to_keep=targets.shape[1] + 1).logits
    assert layer.forward is wrapper
    assert logits.shape[1] == 0 and logits.grad_fn is not None and captured.hidden.shape[1] == targets.shape[1] + 1


def test_sft_loss_equals_the_models_own_causal_lm_loss(tiny_llama):
    model = lora_model(tiny_llama)
    inputs, targets = scored_batch()
    labels = torch.cat([torch.full((3, 5), IGNORE_INDEX), targets[:, 1:]], dim=1)  # prompt-masked, 14 columns
    trainer = LabelledTokenTrainer.__new__(LabelledTokenTrainer)  # compute_loss reads no Trainer state here

    model.zero_grad()
    ours = trainer.compute_loss(model, {**inputs, "labels": labels}, num_items_in_batch=None)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    theirs = model(**inputs, labels=labels).loss  # transformers' ForCausalLMLoss over the full logits
    theirs.backward()

    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_models_whose_logits_are_not_the_output_layers_are_not_bypassed(tiny_llama):
    model = load_tiny(tiny_llama)
    assert output_layer(model) is None  # a trained output layer (full fine-tune) needs its gradient
    model.get_output_embeddings().weight.requires_grad_(False)
    assert output_layer(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma 2: logits = 30 tanh(z / 30), after the layer
    assert output_layer(model) is None
    inputs, targets = scored_batch()
    logps = next_token_logps(model, targets, **inputs)[0]  # through the model's logits
    assert torch.isfinite(logps).all()
