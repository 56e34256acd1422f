"""`align grpo` on tiny models: it learns, the first update is exact, dead runs stop, GSM8K runs end to end.

The learning test needs a policy with something to choose between: ``yes_no_model`` (conftest), a
tiny Llama fine-tuned to answer "Pick one." with "yes" or "no"; the reward is "contains yes".
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ShiftedSampler, p_yes, ptx_rows, tiny_recipe, write_jsonl

from align.recipe import load_recipe
from align.stages.grpo import run_grpo

YES = {"type": "rule", "name": "contains_marker", "marker": "yes"}


def grpo_recipe(tmp_path, model_dir, prompts, **grpo_stage) -> Path:
    stage = {
        "reward": YES,
        "rollout": {"engine": "hf", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 2},
        "train": {"max_steps": 10, "lr": 1e-2, "batch_size": 16},
    }
    for key, value in grpo_stage.items():
        stage[key] = {**stage.get(key, {}), **value} if isinstance(value, dict) else value
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    return tiny_recipe(
        tmp_path / "grpo.yaml", model_dir, str(data), lora={"r": 8, "alpha": 16, "dropout": 0.0}, stages={"grpo": stage}
    )


def test_grpo_learns_to_say_yes_through_the_cli(tmp_path, yes_no_model):
    from align.models.trained import load_trained

    recipe = grpo_recipe(tmp_path, yes_no_model, [{"prompt": "Pick one."}] * 32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "grpo", "--recipe", str(recipe), "--output-dir", str(tmp_path / "grpo")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hf (transformers generate" in proc.stdout
    base, tokenizer = load_trained(yes_no_model)
    trained, _ = load_trained(tmp_path / "grpo")
    before, after = p_yes(base, tokenizer), p_yes(trained, tokenizer)
    assert 0.3 < before < 0.8 and after > before + 0.05, (before, after)
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for key in (
        "reward_mean",
        "reward_std",
        "clip_fraction",
        "approx_kl",
        "entropy",
        "completion_length",
        "truncated_fraction",
        "logprob_mismatch_mean",
        "time/generation",
        "time/training",
        "time/sync",
    ):
        assert key in records[0], key
    # one update per batch: the update's ratio is exactly 1 (nothing clipped, no drift)
    assert all(r["approx_kl"] == 0 and r["clip_fraction"] == 0 for r in records)
    assert all(r["logprob_mismatch_max"] < 1e-4 for r in records)  # hf sampler == trainer
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["algorithm"] == "grpo" and manifest["stopped_early"] is None
    assert (tmp_path / "grpo" / "reward.png").is_file()


def test_kl_is_zero_at_the_start_and_epochs_move_the_ratio(tmp_path, yes_no_model):
    recipe = load_recipe(grpo_recipe(tmp_path, yes_no_model, [{"prompt": "Pick one."}] * 16))
    cfg = recipe.resolve("grpo", ["grpo.kl_coef=0.1", "grpo.epochs=2", "grpo.minibatch_size=16", "train.max_steps=2"])
    out = run_grpo(cfg, tmp_path / "out", recipe_name="tiny")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0  # a fresh adapter starts exactly as the reference (adapter disabled)
    assert first["kl_in_loss"] > 0 and first["approx_kl"] > 0  # later minibatches see a policy that has moved
    assert not (out / "adapter" / "reference").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_identical_rewards_give_zero_advantage_and_no_update(tmp_path, yes_no_model, algorithm):
    from safetensors.torch import load_file

    # the empty marker is in every text: every reward is 1, every advantage 0, the adapter stays at its start
    recipe = load_recipe(
        grpo_recipe(
            tmp_path,
            yes_no_model,
            [{"prompt": "Pick one."}] * 8,
            reward={"type": "rule", "name": "contains_marker", "marker": ""},
        )
    )
    out = run_grpo(
        recipe.resolve("grpo", [f"grpo.algorithm={algorithm}", "train.max_steps=2"]),
        tmp_path / "out",
        recipe_name="tiny",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["advantage_abs"] == 0 and r["loss"] == 0 and r["reward_std"] == 0 for r in records)
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if "lora_B" in k)


def test_a_run_with_no_signal_stops_with_an_explanation(tmp_path, tiny_llama):
    """RELIABILITY 16: a random model never ends within 2 tokens and the reward is constant."""
    recipe = load_recipe(
        grpo_recipe(
            tmp_path,
            tiny_llama,
            [{"prompt": "Say something."}] * 8,
            reward={"type": "rule", "name": "contains_marker", "marker": "zzqqzz"},
        )
    )
    cfg = recipe.resolve("grpo", ["grpo.dead_steps=2", "train.max_steps=6"])
    out = run_grpo(cfg, tmp_path / "out", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 2 and "no learning signal for 2 steps" in manifest["stopped_early"]


def test_gsm8k_prompts_with_the_exact_answer_rule_run_end_to_end(tmp_path, tiny_gpt2):
    """The reference column comes from the rows' completions; RLOO with a KL term on a GPT-2 model."""
    recipe = tiny_recipe(
        tmp_path / "gsm.yaml",
        tiny_gpt2,
        str(FIXTURES / "gsm8k-40.jsonl"),
        data={"eval_rows": 4},
        stages={
            "grpo": {
                "reward": [
                    {"type": "rule", "name": "gsm8k_exact", "weight": 1.0},
                    {"type": "rule", "name": "answer_format", "weight": 0.5},
                ],
                "rollout": {"engine": "hf", "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
                "grpo": {"algorithm": "rloo", "kl_coef": 0.05, "dead_steps": 0},
                "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2},
            }
        },
    )
    out = run_grpo(load_recipe(recipe).resolve("grpo"), tmp_path / "out", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 2 and manifest["eval_reward_start"] == 0.0 and "gsm8k_exact" in manifest["reward"]
    assert manifest["data"]["train"]["kept"] == 40


def test_recipe_checks_groups_and_reward_sources(tmp_path, tiny_llama):
    from align.config import RecipeError

    recipe = load_recipe(grpo_recipe(tmp_path, tiny_llama, [{"prompt": "x"}]))
    with pytest.raises(RecipeError, match="samples_per_prompt >= 2"):
        recipe.resolve("grpo", ["rollout.samples_per_prompt=1"])
    with pytest.raises(RecipeError, match="reward from: reward names no earlier stage"):
        recipe.resolve("grpo", ["reward={type: learned, from: reward}"])


@pytest.mark.parametrize("cap, expected_weight, truncated", [(3.0, math.exp(0.5), 0.0), (1.2, 1.2, 1.0)])
def test_a_mismatched_sampler_gets_truncated_importance_weights(
    tmp_path, yes_no_model, monkeypatch, cap, expected_weight, truncated
):
    import align.stages.grpo as grpo_stage

    real = grpo_stage.rollout_engine
    monkeypatch.setattr(grpo_stage, "rollout_engine", lambda *args: ShiftedSampler(real(*args), shift=0.5))
    recipe = load_recipe(grpo_recipe(tmp_path, yes_no_model, [{"prompt": "Pick one."}] * 8))
    out = run_grpo(
        recipe.resolve("grpo", ["train.max_steps=2", f"rollout.importance_cap={cap}"]),
        tmp_path / "out",
        recipe_name="tiny",
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:  # the sampler said e^-0.5 of the trainer's probability: weight e^0.5, unless capped
        assert m["is_weight_mean"] == pytest.approx(expected_weight, abs=1e-4)
        assert m["is_truncated_fraction"] == truncated
        assert m["logprob_mismatch_mean"] == pytest.approx(0.5, abs=1e-4)


def test_the_hf_engine_needs_no_correction_and_forcing_it_changes_nothing(tmp_path, yes_no_model):
    recipe = load_recipe(grpo_recipe(tmp_path, yes_no_model, [{"prompt": "Pick one."}] * 8))
    auto = run_grpo(recipe.resolve("grpo", ["train.max_steps=1"]), tmp_path / "auto", recipe_name="tiny")
    forced = run_grpo(
        recipe.resolve("grpo", ["train.max_steps=1", "rollout.importance_correction=true"]),
        tmp_path / "on",
        recipe_name="tiny",
    )
    auto_m, forced_m = (json.loads((out / "metrics.jsonl").read_text().splitlines()[0]) for out in (auto, forced))
    assert "is_weight_mean" not in auto_m
    assert forced_m["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # the hf sampler is the trainer's forward
    assert forced_m["loss"] == pytest.approx(auto_m["loss"], abs=1e-4)


def test_one_update_per_rollout_takes_the_old_logprobs_from_its_own_forward(tmp_path, yes_no_model, monkeypatch):
    """One epoch, one minibatch: no separate no-grad pass for the rollout policy's logprobs (issue 16);
    the run equals one that makes that pass - the same metrics (KL to the reference, importance weights,
    entropy, loss) and the same adapter - with a sampler that is not the trainer and a KL term on."""
    from safetensors.torch import load_file

    import align.stages.grpo as grpo_stage

    real = grpo_stage.rollout_engine
    monkeypatch.setattr(grpo_stage, "rollout_engine", lambda *args: ShiftedSampler(real(*args), shift=0.2))
    recipe = load_recipe(grpo_recipe(tmp_path, yes_no_model, [{"prompt": "Pick one."}] * 8))
    cfg = recipe.resolve("grpo", ["train.max_steps=2", "grpo.kl_coef=0.1", "train.batch_size=8"])
    fused = run_grpo(cfg, tmp_path / "fused", recipe_name="tiny")
    passes = []
    monkeypatch.setattr(grpo_stage, "update_gives_old_logprobs", lambda *args: passes.append(args) or False)
    separate = run_grpo(cfg, tmp_path / "separate", recipe_name="tiny")
    assert passes == [(1, 32, 32)]  # the decision was taken, for this one-update shape

    keys = ["kl", "is_weight_mean", "is_weight_max", "entropy", "loss", "logprob_mismatch_mean", "reward_mean"]
    for a, b in zip(
        *((json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) for out in (fused, separate))
    ):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["clip_fraction"] == 0 and a["approx_kl"] == 0  # the ratio is exactly 1 in the update
    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (fused, separate))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert any((load_file(fused / "adapter" / "adapter_model.safetensors")[k] != 0).any() for k in a if "lora_B" in k)


def test_micro_batches_of_similar_length_drop_padding_and_keep_every_logprob(tiny_llama):
    """Rows sorted by length into micro-batches (ties by index, whatever order they came in), each cut
    to its own longest prompt and completion (issue 16): the trainer's logprobs equal the whole padded
    batch's, and the completion columns read with ``columns`` line up with the kept ones."""
    from conftest import load_tiny

    from align.rollout.engine import Rollout
    from align.rollout.scoring import policy_outputs, rollout_batch
    from align.stages.rl_update import columns, micro_batches, select_rows

    model = load_tiny(tiny_llama).eval()
    lengths = [(3, 9), (12, 2), (5, 5), (3, 1), (12, 8), (4, 6)]  # (prompt, completion) tokens
    rollouts = [
        Rollout(i, list(range(10, 10 + p)), list(range(20, 20 + c)), [], "length", "")
        for i, (p, c) in enumerate(lengths)
    ]
    batch = rollout_batch(rollouts, pad_id=0)
    assert batch["input_ids"].shape == (6, 21)
    with torch.no_grad():
        full = policy_outputs(model, batch, 1.0)[0]
    chunks = list(micro_batches([5, 0, 3, 1, 4, 2], 2, batch))
    assert chunks == [[3, 2], [5, 0], [1, 4]]  # total lengths 4, 10, 10, 12, 14, 20
    shapes = []
    for rows in chunks:
        micro = select_rows(batch, rows, "cpu")
        width = micro["completion_ids"].shape[1]
        shapes.append((micro["input_ids"].shape[1], width))
        with torch.no_grad():
            logps = policy_outputs(model, micro, 1.0)[0]
        torch.testing.assert_close(logps, columns(full, rows, width, "cpu"), atol=1e-5, rtol=1e-5)
        kept = columns(batch["completion_mask"], rows, width, "cpu").sum(-1)
        assert kept.tolist() == [lengths[r][1] for r in rows]  # no completion token was cut
    assert shapes == [(10, 5), (13, 9), (20, 8)]


# The hf engine seeds once per generate call, so a step's samples depend on how its prompts are split.
# Seeded per prompt instead, both runs draw the same answers and the updates can be compared exactly;
# each process also records the prompts it answered (ROWS_DIR/rank<RANK>.jsonl).
SEED_BY_PROMPT = """
import dataclasses, json, os, zlib
from align.rollout.hf import HFEngine

def seeded_by_prompt(original, rows_dir):
    def generate_ids(self, prompts, sampling):
        with open(os.path.join(rows_dir, "rank%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
            f.write(json.dumps({"seed": sampling.seed % 1_000_003, "prompts": prompts}) + "\\n")
        out = []
        for i, prompt in enumerate(prompts):
            seed = (sampling.seed % 1_000_003) * 7919 + zlib.crc32(str(prompt).encode())
            drawn = original(self, [prompt], dataclasses.replace(sampling, seed=seed))
            out += [dataclasses.replace(r, prompt_index=i) for r in drawn]
        return out
    return generate_ids
"""
LAUNCH_SEEDED = (
    SEED_BY_PROMPT
    + """
import runpy, sys
HFEngine.generate_ids = seeded_by_prompt(HFEngine.generate_ids, os.environ["ROWS_DIR"])
sys.argv = ["align", *sys.argv[1:]]
runpy.run_module("align.cli", run_name="__main__", alter_sys=True)
"""
)


def two_processes_and_one(tmp_path, kind: str, recipe: Path, run_one, monkeypatch) -> dict[str, Path]:
    """The stage under torchrun with 2 processes and in this process, both with answers seeded per prompt;
    checks that each process answered its own half of every step's prompts and that both runs sampled the
    same rollouts. Returns {"two": folder, "one": folder}."""
    from align.rollout.hf import HFEngine

    runs = {"two": tmp_path / "two", "one": tmp_path / "one"}
    for name in runs:
        (tmp_path / f"{name}-rows").mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH_SEEDED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ROWS_DIR": str(tmp_path / "two-rows")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), kind]
        + ["--recipe", str(recipe), "--output-dir", str(runs["two"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"processes +2: each rolls out", proc.stdout)
    namespace: dict = {}
    exec(SEED_BY_PROMPT, namespace)
    seeded = namespace["seeded_by_prompt"](HFEngine.generate_ids, tmp_path / "one-rows")
    monkeypatch.setattr(HFEngine, "generate_ids", seeded)
    run_one(load_recipe(recipe).resolve(kind), runs["one"], recipe_name="tiny")
    # each process answered its own share of every call's prompts (a step's half, every other held-out prompt);
    # together the one process's prompts
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    answered = {rank: read(tmp_path / "two-rows" / f"rank{rank}.jsonl") for rank in (0, 1)}
    for step, whole in enumerate(read(tmp_path / "one-rows" / "rank0.jsonl")):
        first, second = answered[0][step]["prompts"], answered[1][step]["prompts"]
        assert sorted(map(str, first + second)) == sorted(map(str, whole["prompts"])) and first != second
    # the same samples and rewards, gathered in the one process's order
    assert (runs["two"] / "rollouts.jsonl").read_text() == (runs["one"] / "rollouts.jsonl").read_text()
    return runs


def assert_same_training(runs: dict[str, Path], keys: tuple[str, ...], files=("adapter/adapter_model.safetensors",)):
    """The same weights and logged numbers after training in 2 processes as in 1.

    Tolerance: fp32; the runs differ in summation order only (two half-batch gradients summed by gloo vs one
    backward), and the logged losses agree to ~1e-5. AdamW moves each weight by about lr a step whatever its
    gradient's size, so a weight whose gradient terms cancel to near eps (1e-8) takes the cancellation's
    rounding into its update: measured, one weight in 512 off by 2% of the run's movement after 8 PPO
    optimizer steps (GRPO: 2.3e-5, on 2 of 256). So the check is on the whole update: the difference's norm
    within 1% of the norm of what lora_B (zero at the start) moved - a row missing or counted twice changes
    the update by tens of percent - and every weight within 1e-3."""
    from safetensors.torch import load_file

    for name in files:
        a, b = (load_file(str(runs[n] / name)) for n in ("two", "one"))
        assert a.keys() == b.keys()
        difference = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        moved = sum(float(b[k].norm() ** 2) for k in b if "lora_B" in k or "lora" not in k) ** 0.5
        assert moved > 1e-3 and difference < 0.01 * moved, (name, difference, moved)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=0)
    logged = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs}
    assert [r["step"] for r in logged["two"]] == [r["step"] for r in logged["one"]] == [1, 2]
    for two, one in zip(logged["two"], logged["one"]):
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.heavy
@pytest.mark.parametrize("minibatch", [None, 4])
def test_grpo_under_torchrun_equals_one_process(tmp_path, yes_no_model, monkeypatch, minibatch):
    """torchrun with 2 processes (gloo): each answers half of a step's prompts with its own engine, and the
    run equals one process on the same samples - the same adapter after 2 steps and the same logged
    numbers - with one minibatch a step (the fused old-logprob path) and with 4 (rows of both processes
    mixed in a minibatch, the denominators the whole minibatch's; a ptx term too). The monitors' held-out
    measurements (5 prompts spread unevenly over the processes) give the same numbers, per prompt, as in one
    process."""
    prompts = [{"prompt": f"Pick one. ({i})"} for i in range(16)]  # distinct: the two shares differ
    stage = {
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 1},
        "data": {"eval_rows": 5},
        "monitor": {"rewards": {"no": NO}, "every": 1, "select": "last"},  # the output: the trained adapter
    }
    if minibatch:  # and a ptx term of 3 rows an optimizer step, split 2 + 1 over the processes
        stage["grpo"] = {"minibatch_size": minibatch}
        stage["ptx"] = {"coef": 0.5, "data": str(ptx_rows(tmp_path)), "rows": 3}
    recipe = grpo_recipe(tmp_path, yes_no_model, prompts, **stage)
    runs = two_processes_and_one(tmp_path, "grpo", recipe, run_grpo, monkeypatch)
    held_out = ("held_out/proxy", "held_out/no", "held_out/proxy_agrees/no")
    ptx = ("ptx_nll",) if minibatch else ()
    assert_same_training(runs, ("reward_mean", "reward_std", "completion_length", "loss", "grad_norm", *held_out, *ptx))
    manifests = {n: json.loads((runs[n] / "manifest.json").read_text()) for n in runs}
    for key in ("held_out_start", "held_out_end", "monitor", "proxy_agreement"):
        assert manifests["two"][key] == manifests["one"][key], key
    assert (manifests["two"]["processes"], manifests["one"]["processes"]) == (2, 1)  # and their model cards say so
    assert "| processes | 2 |" in (runs["two"] / "adapter" / "README.md").read_text()
    # the per-prompt scores a checkpoint keeps (the start's, and the best's) are in the prompts' order in both
    states = {n: json.loads((runs[n] / "checkpoints" / "checkpoint-1" / "loop_state.json").read_text()) for n in runs}
    assert states["two"]["held_out"] == states["one"]["held_out"] and len(states["one"]["held_out"]["start"]["no"]) == 5


@pytest.mark.heavy
def test_grpo_under_torchrun_killed_then_resumed_equals_the_uninterrupted_run(tmp_path, yes_no_model):
    """2 processes, SIGKILL after step 2 (its checkpoint not written), `--resume` with 2 processes again:
    every process restarts from process 0's checkpoint 1, and the adapter, rollouts and logged numbers are
    bitwise those of the uninterrupted 2-process run."""
    from safetensors.torch import load_file

    prompts = [{"prompt": f"Pick one. ({i})"} for i in range(16)]
    recipe = grpo_recipe(
        tmp_path,
        yes_no_model,
        prompts,
        rollout={"prompts_per_step": 4, "samples_per_prompt": 4},
        train={"max_steps": 3, "batch_size": 4, "save_steps": 1},
    )

    def torchrun(out: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
        env.pop("ALIGN_FAULT", None)
        if fault:
            env["ALIGN_FAULT"] = fault
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli"]
        return subprocess.run(
            command + ["grpo", "--recipe", str(recipe), "--output-dir", str(out), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    whole = torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    killed = torchrun(tmp_path / "resumed", fault="grpo:step:2")
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "manifest.json").exists()
    resumed = torchrun(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "checkpoints/checkpoint-1" in resumed.stdout  # the plan's resume line
    a, b = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "rollouts.jsonl").read_text() == (tmp_path / "resumed" / "rollouts.jsonl").read_text()
    numbers = lambda n: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
        for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
    ]
    assert numbers("whole") == numbers("resumed") and [r["step"] for r in numbers("whole")] == [1, 2, 3]


NO = {"type": "rule", "name": "contains_marker", "marker": "no"}


def _monitored_grpo(tmp_path, model, name: str, monitor: dict) -> Path:
    """Four GRPO steps rewarded for "yes" on the yes/no model, with 32 held-out prompts."""
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": "Pick one."}] * 32)
    (tmp_path / name).mkdir()
    recipe = grpo_recipe(
        tmp_path / name,
        model,
        [{"prompt": "Pick one."}] * 32,
        data={"eval": [str(held_out)]},
        train={"max_steps": 4},
        monitor=monitor,
    )
    return run_grpo(load_recipe(recipe).resolve("grpo"), tmp_path / name / "out", recipe_name="tiny")


def _adapter(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def test_monitors_raise_the_alarm_when_the_proxy_works_against_them_and_keep_the_best_policy(tmp_path, yes_no_model):
    """Rewarded for "yes", GRPO raises the held-out proxy while a monitor paying for "no" - the shape of
    a proxy optimised against the truth - falls, both on the same answers every 2 steps. The alarm says
    so; with monitor.select: best the stage's output is the start (the monitor's best), and with
    select: last the update is byte-identical to the run without a monitor. An honest monitor raises
    nothing and keeps the last step."""
    from align.models.trained import load_trained

    plain = _monitored_grpo(tmp_path, yes_no_model, "plain", {})
    last = _monitored_grpo(tmp_path, yes_no_model, "last", {"rewards": {"no": NO}, "every": 2, "select": "last"})
    assert _adapter(plain) == _adapter(last)  # monitors change no update
    manifest = json.loads((last / "manifest.json").read_text())
    start, end = manifest["held_out_start"], manifest["held_out_end"]
    assert end["proxy"] > start["proxy"] and end["no"] < start["no"], (start, end)
    assert manifest["eval_reward_start"] == start["proxy"] and 0 < start["proxy_ci"] < 0.5
    rows = [json.loads(line) for line in (last / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "held_out/no" in r] == [2, 4]
    assert rows[-1]["held_out/no"] == end["no"]  # the last step's measurement is the end
    assert (last / "overoptimization.png").stat().st_size > 10_000  # proxy and monitor against the step
    # the proxy orders answers the opposite way to the monitor: an answer it pays for is one the monitor does not
    assert manifest["proxy_agreement"]["end"]["proxy_agrees/no"] <= 0.1 and "held_out/proxy_agrees/no" in rows[-1]
    monitor = manifest["monitor"]
    assert (
        monitor["best_step"] == 0
        and monitor["selected_step"] == 4
        and "reward hacking - monitor 'no'" in (monitor["hacking"])
    )
    plain_manifest = json.loads((plain / "manifest.json").read_text())
    assert set(plain_manifest["held_out_end"]) == {"proxy", "proxy_ci"} and "monitor" not in plain_manifest

    best = _monitored_grpo(tmp_path, yes_no_model, "best", {"rewards": {"no": NO}, "every": 2})
    monitor = json.loads((best / "manifest.json").read_text())["monitor"]
    assert monitor["selected_step"] == 0 and monitor["hacking"]
    base, tokenizer = load_trained(yes_no_model)
    kept, _ = load_trained(best)
    assert abs(p_yes(kept, tokenizer) - p_yes(base, tokenizer)) < 1e-6  # the start: a fresh adapter adds nothing

    # an honest monitor pays for what the proxy pays for: no alarm, its best is the last step, and the output
    # is what it would be without a monitor
    honest = _monitored_grpo(tmp_path, yes_no_model, "honest", {"rewards": {"yes": YES}, "every": 2})
    manifest = json.loads((honest / "manifest.json").read_text())
    monitor = manifest["monitor"]
    assert manifest["proxy_agreement"]["end"]["proxy_agrees/yes"] >= 0.9
    assert monitor["hacking"] is None and monitor["best_step"] == monitor["selected_step"] == 4, monitor
    assert _adapter(plain) == _adapter(honest)


def test_monitor_specs_are_checked_when_the_recipe_is_read(tmp_path, tiny_llama):
    prompts = [{"prompt": "Pick one."}] * 8
    misspelt = grpo_recipe(
        tmp_path,
        tiny_llama,
        prompts,
        data={"eval_rows": 2},
        monitor={"rewards": {"g": {**NO, "name": "contains_markr"}}},
    )
    with pytest.raises(
        Exception, match="monitor.rewards.g: unknown rule 'contains_markr' - did you mean 'contains_marker'"
    ):
        load_recipe(misspelt).resolve("grpo")
    no_held_out = grpo_recipe(tmp_path, tiny_llama, prompts, monitor={"rewards": {"g": NO}})
    with pytest.raises(Exception, match="monitor.rewards are scored on held-out prompts"):
        load_recipe(no_held_out).resolve("grpo")


def test_a_killed_monitored_run_resumes_with_its_best_policy_and_history(tmp_path, yes_no_model):
    """Killed after step 3 (checkpoint at step 2), then resumed: the same verdict and the same kept policy
    (the start's weights, read back from the checkpoint) as the run that was never interrupted."""
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": "Pick one."}] * 32)
    recipe = grpo_recipe(
        tmp_path,
        yes_no_model,
        [{"prompt": "Pick one."}] * 32,
        data={"eval": [str(held_out)]},
        train={"max_steps": 4, "save_steps": 2},
        monitor={"rewards": {"no": NO}, "every": 2},
    )

    def grpo(out: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"ALIGN_FAULT": fault} if fault else {})}
        command = [sys.executable, "-m", "align.cli", "grpo", "--recipe", str(recipe), "--output-dir", str(out)]
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env)

    whole = grpo(tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    assert grpo(tmp_path / "resumed", fault="grpo:step:3").returncode != 0
    resumed = grpo(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("whole", "resumed")]
    assert manifests[0]["monitor"] == manifests[1]["monitor"] and manifests[0]["monitor"]["selected_step"] == 0
    assert manifests[0]["held_out_start"] == manifests[1]["held_out_start"]
    assert _adapter(tmp_path / "whole") == _adapter(tmp_path / "resumed")
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "held_out/no" in r] == [2, 4]  # the history from before the kill kept
