"""`align run` on a tiny model, through the real CLI: every stage kind in one recipe; skipping
what is up to date; re-running exactly what a change reaches; SIGKILL in every stage, then a
resume that ends with the artifacts of an uninterrupted run (RELIABILITY 22, 23)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURES, write_jsonl
from test_dpo import marker_pairs

from align.pipeline import Pipeline, stage_overrides
from align.recipe import load_recipe

STAGES = ["sft", "reward", "dpo", "grpo", "ppo", "eval"]
RL_ROLLOUT = {"engine": "hf", "prompts_per_step": 2, "max_new_tokens": 4}


def pipeline_recipe(folder: Path, model_dir: Path, engine: str = "hf", baselines: tuple = ("sft", "base")) -> Path:
    cache = {"kv_cache_gib": 0.2} if engine == "vllm" else {}
    rl_rollout = {**RL_ROLLOUT, "engine": engine, **cache}
    pairs = write_jsonl(folder / "pairs.jsonl", marker_pairs(16))
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Describe scene {i}."} for i in range(8)])
    learned = {"type": "learned", "from": "reward"}
    train = {"max_steps": 4, "save_steps": 2, "save_total_limit": 3, "batch_size": 4}
    recipe = {
        "name": "tiny-pipeline",
        "model": {"name": str(model_dir), "precision": "fp32", "attn_implementation": "eager"},
        "quantization": {"mode": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 1e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant", **train},
        "stages": {
            "sft": {"data": {"train": str(FIXTURES / "gsm8k-40.jsonl"), "max_length": 128, "max_rows": 16}},
            "reward": {"data": {"train": str(pairs), "max_length": 64}},
            "dpo": {"from": "sft", "data": {"train": str(pairs), "max_length": 64}},
            "grpo": {
                "from": "dpo",
                "reward": learned,
                "data": {"train": str(prompts), "max_length": 64},
                "rollout": {**rl_rollout, "samples_per_prompt": 2},
                "train": {"batch_size": 4},
            },
            "ppo": {
                "from": "sft",
                "reward": learned,
                "data": {"train": str(prompts), "max_length": 64},
                "rollout": RL_ROLLOUT,  # hf: one vLLM RL stage (grpo) shows the engine under torchrun, faster
                "ppo": {"epochs": 2},
                "train": {"batch_size": 2},
            },
            "eval": {
                "policy": "grpo",
                "baselines": list(baselines),
                "judges": {"rm": learned},
                "data": {"eval": str(prompts), "max_length": 64},
                "rollout": {"engine": engine, "max_new_tokens": 4, **cache},
            },
        },
    }
    path = folder / "tiny-pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def align_run(cwd: Path, recipe: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    env.pop("ALIGN_FAULT", None)
    env.pop("ALIGN_RUNS", None)
    if fault:
        env["ALIGN_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(recipe), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def manifests(runs: Path) -> dict[str, dict]:
    return {
        s: json.loads((runs / s / "manifest.json").read_text())
        for s in STAGES
        if (runs / s / "manifest.json").is_file()
    }


def artifacts(runs: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every stage's trained tensors (adapter, value head) and the eval's numbers."""
    from safetensors.torch import load_file

    out = {}
    for stage in STAGES[:-1]:
        for file in sorted((runs / stage / "adapter").glob("*.safetensors")):
            out[f"{stage}/{file.name}"] = load_file(str(file))
    report = json.loads((runs / "eval" / "report.json").read_text())
    out["eval"] = {"results": torch.tensor([[r["win_rate"], r["lc_win_rate"]] for r in report["results"]])}
    return out


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    """The stages a run actually ran, from its stage banners."""
    return [s for s in STAGES if f"stage {s} " in proc.stdout]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = pipeline_recipe(folder, tiny_llama)
    proc = align_run(folder, recipe)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return folder, recipe, proc


def test_all_stages_run_through_the_cli_and_record_their_inputs(uninterrupted):
    folder, recipe, proc = uninterrupted
    runs = folder / "runs" / "tiny-pipeline"
    assert ran(proc) == STAGES
    found = manifests(runs)
    assert all(found[s]["status"] == "complete" for s in STAGES)
    # inputs by stage name: each manifest holds its inputs' artifact hashes
    assert set(found["grpo"]["pipeline"]["inputs"]) == {"dpo", "reward"}
    assert set(found["eval"]["pipeline"]["inputs"]) == {"grpo", "sft", "reward"}
    assert found["sft"]["pipeline"]["inputs"] == {}
    for name in ("report.json", "report.md", "winrate.png"):
        assert (runs / "eval" / name).is_file()
    # a model card beside every adapter; the eval's win-rates in the card of the stage it judged (a second
    # run still skips everything: the card is not part of an artifact's hash)
    from huggingface_hub import ModelCard

    cards = {s: ModelCard.load(runs / s / "adapter" / "README.md") for s in STAGES if s != "eval"}
    assert all(c.data.to_dict()["tags"][:2] == ["align", found[s]["kind"]] for s, c in cards.items())
    result = json.loads((runs / "eval" / "report.json").read_text())["results"][0]
    row = f"| {result['set']} | {result['judge']} | {result['baseline']} | {result['wins']}/{result['ties']}/"
    assert "runs/tiny-pipeline/eval" in cards["grpo"].text and row in cards["grpo"].text
    assert "report: runs/tiny-pipeline/eval/report.md" in proc.stdout


def test_a_second_run_skips_everything_and_a_change_reruns_only_its_dependants(uninterrupted, tmp_path, monkeypatch):
    source, recipe, _ = uninterrupted
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    runs = folder / "runs" / "tiny-pipeline"
    before = manifests(runs)

    again = align_run(folder, recipe)
    assert again.returncode == 0, again.stdout[-3000:]
    assert ran(again) == [] and manifests(runs) == before

    # dpo's learning rate changes: dpo, then grpo (from dpo) and eval (evaluates grpo) re-run; sft,
    # reward and ppo (from sft) do not. The dry run says so and changes nothing.
    dry = align_run(folder, recipe, "dpo.train.lr=0.02", "--dry-run")
    assert dry.returncode == 0 and ran(dry) == [] and manifests(runs) == before
    assert "train.lr 0.01 -> 0.02" in dry.stdout
    changed = align_run(folder, recipe, "dpo.train.lr=0.02")
    assert changed.returncode == 0, changed.stdout[-3000:]
    assert ran(changed) == ["dpo", "grpo", "eval"]
    after = manifests(runs)
    assert all(after[s] == before[s] for s in ("sft", "reward", "ppo"))
    assert all(
        after[s]["written_at"] >= before[s]["written_at"] and after[s]["pipeline"] != before[s]["pipeline"]
        for s in ("dpo", "grpo", "eval")
    )

    # --only --force re-makes one stage; nothing reads ppo's adapter, so nothing else goes stale
    only = align_run(folder, recipe, "dpo.train.lr=0.02", "--only", "ppo", "--force")
    assert only.returncode == 0 and ran(only) == ["ppo"]
    monkeypatch.setenv("ALIGN_RUNS", str(runs.parent))
    plan = lambda: {p.name: p for p in Pipeline(load_recipe(recipe), overrides=["dpo.train.lr=0.02"]).plan()}
    assert all(p.action == "skip" for p in plan().values())
    # an input artifact that changed under a finished stage (sft re-made by hand) makes its readers stale
    (runs / "sft" / "adapter" / "extra.txt").write_text("changed")
    stale = plan()
    assert stale["sft"].action == "skip"
    assert stale["dpo"].action == "run" and "sft were re-made" in stale["dpo"].reason
    assert {n for n, p in stale.items() if p.action == "run"} == {"dpo", "ppo", "grpo", "eval"}


def test_sigkill_in_every_stage_then_resume_gives_the_uninterrupted_artifacts(uninterrupted, tmp_path, tiny_llama):
    source, _, _ = uninterrupted
    recipe = pipeline_recipe(tmp_path, tiny_llama)
    runs = tmp_path / "runs" / "tiny-pipeline"
    finished: dict[str, str] = {}
    # mid-step and mid-save (a checkpoint written but not marked complete), in every stage kind
    for fault in ("sft:step:3", "rm:save:2", "dpo:step:3", "grpo:save:2", "ppo:step:3"):
        proc = align_run(tmp_path, recipe, fault=fault)
        assert proc.returncode == -9, (fault, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
        stage = {"rm": "reward"}.get(fault.split(":")[0], fault.split(":")[0])
        assert not (runs / stage / "manifest.json").exists()
        for name, manifest in manifests(runs).items():  # a finished stage is never redone
            assert finished.setdefault(name, manifest["written_at"]) == manifest["written_at"], name
    last = align_run(tmp_path, recipe)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert ran(last) == ["ppo", "eval"] and "resuming" in last.stdout
    assert json.loads((runs / "ppo" / "manifest.json").read_text())["resumed_from"].endswith("checkpoint-2")
    expected, got = artifacts(source / "runs" / "tiny-pipeline"), artifacts(runs)
    assert expected.keys() == got.keys()
    for name in expected:
        assert all(torch.equal(expected[name][k], got[name][k]) for k in expected[name]), name
    leftovers = [p for p in runs.rglob(".*tmp*")]
    assert leftovers == []


def test_plan_validates_data_before_anything_runs(tmp_path, tiny_llama):
    recipe = pipeline_recipe(tmp_path, tiny_llama)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "fine"}\n{"nope": 1}\n', encoding="utf-8")
    proc = align_run(tmp_path, recipe)
    assert proc.returncode == 2
    assert "prompts.jsonl" in proc.stdout and "row 2" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_stage_prefixed_overrides_reach_only_their_stage():
    stages = ["sft", "dpo"]
    assert stage_overrides(["sft.train.lr=1", "seed=3", "dpo.dpo.beta=0.2"], "sft", stages) == ["train.lr=1", "seed=3"]
    assert stage_overrides(["sft.train.lr=1", "seed=3", "dpo.dpo.beta=0.2"], "dpo", stages) == [
        "seed=3",
        "dpo.beta=0.2",
    ]


def test_a_second_align_run_on_the_same_recipe_is_refused(tmp_path, tiny_llama):
    from align.pipeline import _exclusive_lock

    recipe = pipeline_recipe(tmp_path, tiny_llama)
    folder = tmp_path / "runs" / "tiny-pipeline"
    folder.mkdir(parents=True)
    held = _exclusive_lock(folder / ".lock")
    proc = align_run(tmp_path, recipe)
    held.close()
    assert proc.returncode == 2 and "another align run is using" in proc.stdout
    assert not (folder / "sft").exists()


@pytest.mark.heavy
def test_align_run_under_torchrun_runs_every_stage_kind_once_then_skips(tmp_path, vllm_llama):
    """`torchrun --nproc_per_node 2 -m align.cli run R` (gloo): every stage kind - the Trainer stages and grpo/ppo
    across both processes, eval in process 0 - finishes once, with one lock and one pipeline state between
    the processes; the same command again skips everything. Rollouts from vLLM (the default where it is
    installed): an engine per process in grpo, whose shutdown once destroyed the launcher's process
    group (the next stage failed at its barrier), and eval's engines in process 0 alone, which once hung
    building vLLM's groups over both processes."""
    recipe = pipeline_recipe(tmp_path, vllm_llama, engine="vllm", baselines=("base",))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("ALIGN_RUNS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli", "run"]
    first = subprocess.run(command + [str(recipe)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    runs = tmp_path / "runs" / "tiny-pipeline"
    done = manifests(runs)
    assert sorted(done) == sorted(STAGES) and all(m["status"] == "complete" for m in done.values())
    assert ran(first) == STAGES and first.stdout.count("stage grpo ") == 1  # process 0 speaks for both
    assert "2: each rolls out 1 prompts" in " ".join(first.stdout.split())  # grpo and ppo split the step
    assert done["sft"]["steps"] == 4
    second = subprocess.run(command + [str(recipe)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert ran(second) == [] and manifests(runs) == done
