"""`align sample` on a tiny model: pairs from the policy's own answers, ranked by a reward; chained
into DPO by `data: {from: sample}`, which then moves the policy towards the chosen answers.

``yes_no_model`` (conftest) answers "Pick one." with yes or no, about half each; the reward is
"contains yes", so the pairs are yes (chosen) over no (rejected).
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe, write_jsonl

from align.config import RecipeError
from align.recipe import load_recipe

YES = {"type": "rule", "name": "contains_marker", "marker": "yes"}


def sample_recipe(tmp_path, model_dir, stages: dict, prompts: int = 24):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * prompts)
    return tiny_recipe(
        tmp_path / "recipe.yaml", model_dir, str(data), lora={"r": 8, "alpha": 16, "dropout": 0.0}, stages=stages
    )


SAMPLE = {
    "kind": "sample",
    "reward": YES,
    "data": {"eval_rows": 8},
    "rollout": {"engine": "hf", "samples_per_prompt": 4, "max_new_tokens": 2, "temperature": 1.0},
}


def test_sample_writes_best_vs_worst_pairs_with_counts(tmp_path, yes_no_model, monkeypatch):
    from align.stages.sample import run_sample

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    recipe = load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": SAMPLE}))
    out = run_sample(recipe.resolve("pairs"), tmp_path / "pairs", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["artifact"] == "pairs.jsonl"
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    counts = manifest["pairs"]["train"]
    assert counts["prompts"] == 16 and manifest["pairs"]["held_out"]["prompts"] == 8
    # every prompt gives a pair or is counted as a tie (4 samples of a ~50/50 choice: most give a pair)
    assert counts["pairs"] + counts["ties"] + counts["best_cut_off"] == 16 and counts["pairs"] >= 8
    assert len(pairs) == counts["pairs"] and len(held_out) == manifest["pairs"]["held_out"]["pairs"]
    for pair in pairs + held_out:  # the chosen answer is the one the reward prefers, the prompt what the policy saw
        assert "yes" in pair["chosen"] and "yes" not in pair["rejected"]
        assert pair["chosen_score"] == 1.0 and pair["rejected_score"] == 0.0
        assert pair["prompt"][-1] == {"role": "user", "content": "Pick one."}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 * 4 and {s["split"] for s in samples} == {"train", "held_out"}


def test_sample_resumes_after_its_last_chunk_with_the_same_answers(tmp_path, yes_no_model, monkeypatch):
    from align.stages import sample

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(sample, "CHUNK_PROMPTS", 8)
    recipe = load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": SAMPLE}))
    cfg = recipe.resolve("pairs")
    whole = sample.run_sample(cfg, tmp_path / "whole", recipe_name="tiny")
    # a killed run: only the first chunk made it to disk
    killed = tmp_path / "killed"
    sample.run_sample(cfg, killed, recipe_name="tiny")
    (killed / "manifest.json").unlink()
    for chunk in sorted((killed / "checkpoints").glob("chunk-*.jsonl"))[1:]:
        chunk.unlink()
    first = (killed / "checkpoints" / "chunk-00000.jsonl").read_text()
    sample.run_sample(cfg, killed, recipe_name="tiny", resume=True)
    assert (killed / "checkpoints" / "chunk-00000.jsonl").read_text() == first  # kept, not re-sampled
    assert (killed / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text()
    assert (killed / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()


def test_dpo_on_sampled_pairs_moves_the_policy_to_the_chosen_answers(tmp_path, yes_no_model, monkeypatch, tokenizer):
    """sample -> dpo inside one recipe through align run: `data: {from: pairs}` becomes the pairs'
    files, the plan says they are made when the sample stage runs, and DPO raises P(yes)."""
    from align.models.trained import load_trained
    from align.pipeline import Pipeline

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    dpo = {
        "kind": "dpo",
        "data": {"from": "pairs", "max_length": 64},
        "dpo": {"beta": 0.5},
        "train": {"max_steps": 8, "lr": 5e-3, "batch_size": 4},
    }
    recipe = load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": SAMPLE, "dpo": dpo}, prompts=40))
    cfg = recipe.resolve("dpo")
    folder = tmp_path / "runs" / "tiny" / "pairs"
    assert cfg.data.train == [str(folder / "pairs.jsonl")] and cfg.data.eval == [str(folder / "eval_pairs.jsonl")]
    assert recipe.dependencies("dpo") == ["pairs"]
    pipeline = Pipeline(recipe)
    plans = pipeline.plan()
    assert plans[1].rows == "pairs from pairs (made when it runs)"
    pipeline.run(plans)
    manifest = json.loads((tmp_path / "runs" / "tiny" / "dpo" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["eval_reward_accuracy"] > 0.5
    base, _ = load_trained(yes_no_model)
    trained, _ = load_trained(tmp_path / "runs" / "tiny" / "dpo")
    before, after = yes_over_no(base, tokenizer), yes_over_no(trained, tokenizer)
    assert after > before + 0.5, (before, after)  # what DPO moves: the chosen answer's log-odds over the rejected one
    # a second align run finds everything up to date (the pairs' hash is the sample stage's artifact)
    assert [p.action for p in Pipeline(load_recipe(recipe.path)).plan()] == ["skip", "skip"]


def yes_over_no(model, tokenizer) -> float:
    """log P(yes) - log P(no) as the first answer token to "Pick one."."""
    import torch

    from align.data.templating import encode_prompt

    prompt = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "Pick one."}])])
    with torch.no_grad():
        logp = model(input_ids=prompt).logits[0, -1].log_softmax(-1)
    first = lambda word: tokenizer(word, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return (logp[first("yes")] - logp[first("no")]).item()


def test_data_from_is_checked_when_the_recipe_is_read(tmp_path, yes_no_model):
    sft = {"kind": "sft", "data": {"from": "pairs"}}
    with pytest.raises(RecipeError, match="does not train on preference pairs"):
        load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": SAMPLE, "sft": sft}))
    dpo = {"kind": "dpo", "data": {"from": "sft"}}
    with pytest.raises(RecipeError, match="data from: sft is a sft stage, but preference pairs"):
        load_recipe(sample_recipe(tmp_path, yes_no_model, {"sft": {}, "dpo": dpo}))
    both = {"kind": "dpo", "data": {"from": "pairs", "train": "x.jsonl"}}
    with pytest.raises(RecipeError, match="data.train or data.from"):
        load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": SAMPLE, "dpo": both}))
    pairwise = {**SAMPLE, "reward": {"type": "judge", "model": "x"}}
    with pytest.raises(RecipeError, match="pointwise"):
        load_recipe(sample_recipe(tmp_path, yes_no_model, {"pairs": pairwise}))
