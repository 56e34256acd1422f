"""The before/after checkup of policy stages and the collapse alarm, on tiny models.

``yes_no_model`` (conftest) answers "Pick one." with yes or no; the checkup's reward is "contains
yes". A run with a sane learning rate reports and completes; one with a huge learning rate is
stopped by the alarm (RL: KL per step; DPO: the chosen answers' likelihood), its folder marked
collapsed, never complete - so `align run` will not build on it.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_jsonl

from align.recipe import load_recipe
from align.stages.checkup import CollapseAlarm

YES = {"type": "rule", "name": "contains_marker", "marker": "yes"}


def test_health_pair_and_task_doctests():
    import align.data.builtin
    import align.eval.health
    import align.eval.reward_quality
    import align.stages.checkup
    import align.stages.monitors
    import align.stages.sample

    modules = (
        align.eval.health,
        align.eval.reward_quality,
        align.stages.sample,
        align.data.builtin,
        align.stages.monitors,
        align.stages.checkup,  # the alarm reads every named set
    )
    for module in modules:
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module


def test_arithmetic_held_out_questions_share_no_first_operand_with_training():
    import re

    from align.data.builtin import arithmetic_rows
    from reward_models.rules import gsm8k_exact

    train, held_out = arithmetic_rows()
    first = lambda rows: {int(re.search(r"What is (\d+) \*", r["prompt"]).group(1)) for r in rows}  # noqa: E731
    assert first(train).isdisjoint(first(held_out)) and len(first(held_out)) == 16
    assert len({r["prompt"] for r in train + held_out}) == 720
    # every worked answer is right by the verifier the recipes judge with
    rows = train + held_out
    assert gsm8k_exact(None, [r["completion"] for r in rows], [r["completion"] for r in rows]) == [1.0] * 720
    assert arithmetic_rows() == (train, held_out)  # seeded: the same files on every machine


def test_arithmetic_re_forms_ask_the_held_out_questions_otherwise_and_prepare_adds_only_missing_files(tmp_path):
    """reworded: 64 held-out questions asked plainly, with their answers; harder: three-digit
    first operands no training row has. `align data prepare` run again adds the files an older prepare did
    not write, keeps identical ones and refuses to replace a file that differs (the user's own)."""
    import re

    from align.data.builtin import arithmetic_reforms, arithmetic_rows, prepare
    from reward_models.rules import gsm8k_exact

    train, held_out = arithmetic_rows()
    sets = arithmetic_reforms()
    pairs = lambda rows, pattern: [tuple(map(int, re.search(pattern, r["prompt"]).groups())) for r in rows]  # noqa: E731
    assert pairs(sets["reworded"], r"Multiply (\d+) by (\d+)") == pairs(held_out[:64], r"What is (\d+) \* (\d+)")
    assert [r["completion"] for r in sets["reworded"]] == [r["completion"] for r in held_out[:64]]
    harder = pairs(sets["harder"], r"What is (\d+) \* (\d+)")
    assert all(100 <= a < 1000 for a, _ in harder)
    answers = [r["completion"] for r in sets["harder"]]
    assert gsm8k_exact(None, [f"#### {a * b}" for a, b in harder], answers) == [1.0] * 64

    folder = tmp_path / "arithmetic"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))  # an older prepare's file
    _, counts = prepare("arithmetic", folder)
    assert (
        sorted(p.name for p in folder.iterdir())
        == sorted(counts)
        == ["eval.jsonl", "eval_harder.jsonl", "eval_reworded.jsonl", "train.jsonl", "train_varied.jsonl"]
    )
    # the varied training forms ask the training questions only, never in an eval set's form
    varied = [json.loads(line) for line in (folder / "train_varied.jsonl").read_text().splitlines()]
    numbers = lambda rows: sorted(tuple(sorted(map(int, re.findall(r"\d+", r["prompt"])))) for r in rows)  # noqa: E731
    assert numbers(varied) == numbers(train) and not any(r["prompt"].startswith("Multiply") for r in varied)
    (folder / "eval.jsonl").write_text('{"prompt": "mine", "completion": "#### 1"}\n')
    with pytest.raises(FileExistsError, match="eval.jsonl already exists and differs"):
        prepare("arithmetic", folder)
    assert (folder / "eval.jsonl").read_text().startswith('{"prompt": "mine"')  # the user's file is untouched


def recipe_with_checkup(tmp_path, model_dir, stages: dict, **checkup):
    """A recipe whose checkup reads "Pick one." prompts. The general probe is off unless asked for: the
    yes/no model knows no general text (about -20 nats per token), so what it measures there says
    nothing; the probe has its own tests."""
    checkup = {"general": None, **checkup}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 32)
    return load_recipe(
        tiny_recipe(
            tmp_path / "recipe.yaml",
            model_dir,
            str(prompts),
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            checkup={"prompts": str(prompts), "max_prompts": 4, "reward": YES, "max_new_tokens": 4, **checkup},
            stages=stages,
        )
    )


GRPO = {
    "kind": "grpo",
    "reward": YES,
    "rollout": {"engine": "hf", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 2},
    "grpo": {"kl_coef": 0.05},
}


def test_grpo_reports_its_checkup_and_completes(tmp_path, yes_no_model):
    from align.stages.grpo import run_grpo

    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}}
    )
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    checkup = manifest["checkup"]
    assert manifest["status"] == "complete" and checkup["collapse"] == []
    assert checkup["prompts"] == 4 and checkup["start"] == "base (adapter off)"
    for side in ("before", "after"):
        assert set(checkup[side]) == {"reward", "loop_fraction", "distinct_2", "length_mean", "truncated_fraction"}
    # the policy learned to say yes, so it moved away from its start: a positive KL, a reward that did not fall
    assert 0 < checkup["kl_per_token"] < 1.0
    assert checkup["after"]["reward"] >= checkup["before"]["reward"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loop_fraction" in r and "distinct_2" in r for r in records)


def _sft_on_yes(tmp_path, tiny_llama, lr: float, steps: int, **checkup):
    from align.stages.sft import run_sft

    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"Is {i} a number?", "completion": "yes"} for i in range(24)]
    )
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": f"Is {i} a number?"} for i in range(90, 94)])
    recipe = load_recipe(
        tiny_recipe(
            tmp_path / "recipe.yaml",
            tiny_llama,
            str(rows),
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            checkup={"prompts": str(held_out), "max_prompts": 4, "max_new_tokens": 4, "reward": YES, **checkup},
            stages={"sft": {"train": {"max_steps": steps, "lr": lr, "batch_size": 8}}},
        )
    )
    return run_sft(recipe.resolve("sft"), tmp_path / "sft", recipe_name="tiny")


def test_sft_raises_held_out_exact_match_from_zero(tmp_path, tiny_llama):
    """SFT's checkup on prompts it never trained on: the random tiny model never answers "yes"
    (reward 0); taught to answer "yes" to 24 questions, it answers the 4 held-out ones with it
    (reward 1). With the update disabled the after side equals the before side, so this fails."""
    out = _sft_on_yes(tmp_path, tiny_llama, 2e-2, 30)
    checkup = json.loads((out / "manifest.json").read_text())["checkup"]
    assert checkup["before"]["reward"] == 0.0 and checkup["after"]["reward"] == 1.0, checkup
    assert checkup["collapse"] == []  # SFT has no KL alarm: moving far from the start is its job


def test_the_general_probe_measures_the_tax_of_a_narrow_run_and_alarms_past_its_threshold(tmp_path, yes_no_model):
    """The yes/no model, taught to say only "yes", finds the answer "no" to other questions less likely:
    the probe (here on a small reference file) measures the fall, and past max_general_drop the stage is
    marked collapsed although its own task stays solved (with the alarm on, any reason stops the stage:
    test_collapse_alarm_stops_rl_with_a_huge_learning_rate). A gentle run (a few small steps, on the builtin
    reference texts) moves the probe far less and passes."""
    from align.eval.general_probe import probe_reason

    other = [("Is the sky green?", "no"), ("Is ice hot?", "no"), ("Can fish fly?", "no"), ("Is 7 even?", "no")]
    reference = write_jsonl(
        tmp_path / "other.jsonl",
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in other],
    )
    hard = _sft_on_yes(tmp_path / "hard", yes_no_model, 2e-2, 30, alarm=False, general=str(reference))
    checkup = json.loads((hard / "manifest.json").read_text())["checkup"]
    general = checkup["general"]
    assert general["rows"] == {"other": 4} and checkup["after"]["reward"] == 1.0
    assert general["base"] == general["before"]  # an sft stage starts from the base
    tax = general["before"]["mean"] - general["after"]["mean"]
    assert tax > 0.15, general  # a measured tax, past the default threshold
    assert [r for r in checkup["collapse"] if r.startswith("general ability")] == [probe_reason(general, 0.15)]

    gentle = _sft_on_yes(tmp_path / "gentle", yes_no_model, 1e-3, 3)
    moved = json.loads((gentle / "manifest.json").read_text())["checkup"]
    assert moved["general"]["texts"] == "builtin"
    assert moved["general"]["rows"] == {"conversation": 8, "reasoning": 8, "summaries": 8}
    assert [e["kind"] for e in moved["general"]["examples"]] == ["conversation", "reasoning", "summaries"]
    assert abs(moved["general"]["before"]["mean"] - moved["general"]["after"]["mean"]) < 0.15  # the default
    assert not [r for r in moved["collapse"] if r.startswith("general ability")]


def test_the_probe_log_likelihood_is_the_mean_answer_token_log_prob_of_the_full_forward(tiny_llama, tokenizer):
    """Exact cross-check of the probe's sliced forward (logits from the first answer token on, padded
    batches of texts with different lengths, several answer turns) against log-softmax over every
    position of each text alone."""
    from transformers import AutoModelForCausalLM

    from align.data.templating import encode_conversation
    from align.eval.general_probe import log_likelihood

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    talk = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
        [
            {"role": "user", "content": "What is two and two, and why?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, quite sure of it."},
        ],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
    ]
    encoded = [encode_conversation(tokenizer, m, 512) for m in talk]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            logprobs = model(torch.tensor([e.input_ids])).logits[0, :-1].log_softmax(-1)
            for t, label in enumerate(e.labels[1:]):
                if label != -100:
                    total, tokens = total + logprobs[t, label].item(), tokens + 1
    measured = log_likelihood(model, {"talk": encoded}, tokenizer.pad_token_id, "fp32", batch_size=2)
    assert measured["talk"] == pytest.approx(total / tokens, abs=1e-5) and measured["mean"] == measured["talk"]


def test_grpo_raises_the_checkup_reward_from_zero(tmp_path, yes_no_model):
    """The start's greedy answer is "yes" (it samples no about half the time): rewarded for "no", GRPO
    turns the greedy answer around, so the checkup's verifier goes 0 -> 1. With the update disabled
    the greedy answer stays "yes" and this fails."""
    from align.stages.grpo import run_grpo

    no = {"type": "rule", "name": "contains_marker", "marker": "no"}
    grpo = {**GRPO, "reward": no, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"grpo": grpo}, reward=no)
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    checkup = json.loads((out / "manifest.json").read_text())["checkup"]
    assert checkup["before"]["reward"] == 0.0 and checkup["after"]["reward"] == 1.0, checkup
    assert checkup["collapse"] == []


def test_named_checkup_sets_are_measured_apart_and_any_set_raises_the_alarm(tmp_path, yes_no_model):
    """GRPO paid for "no" on "Pick one." while the checkup's reward is "yes": the greedy answer turns
    from yes to no there. With that set named second, the alarm must still read it (a first-set-only
    alarm would miss the fall); the manifest keeps each set's before and after."""
    from align.stages.grpo import run_grpo

    no = {"type": "rule", "name": "contains_marker", "marker": "no"}
    hello = write_jsonl(tmp_path / "hello.jsonl", [{"prompt": "Say hello."}] * 4)
    pick = write_jsonl(tmp_path / "pick.jsonl", [{"prompt": "Pick one."}] * 4)
    grpo = {**GRPO, "reward": no, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"grpo": grpo}, alarm=False)
    cfg = recipe.resolve("grpo")
    cfg.checkup = cfg.checkup.model_validate(
        {**cfg.checkup.model_dump(exclude={"prompts", "sets"}), "prompts": {"hello": str(hello), "pick": str(pick)}}
    )
    out = run_grpo(cfg, tmp_path / "grpo", recipe_name="tiny")
    checkup = json.loads((out / "manifest.json").read_text())["checkup"]
    assert list(checkup["sets"]) == ["hello", "pick"] and checkup["prompts"] == 8
    assert checkup["before"] == checkup["sets"]["hello"]["before"]  # before / after: the first set's
    pick_set = checkup["sets"]["pick"]
    assert pick_set["before"]["reward"] == 1.0 and pick_set["after"]["reward"] == 0.0, pick_set
    assert "set pick: held-out reward fell from 1.000 to 0.000 (threshold -0.15)" in checkup["collapse"]


def test_collapse_alarm_stops_rl_with_a_huge_learning_rate(tmp_path, yes_no_model):
    from align.stages.grpo import run_grpo

    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 10, "lr": 1.0, "batch_size": 16}}}
    )
    with pytest.raises(CollapseAlarm, match="KL"):
        run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["status"] == "collapsed" and manifest["stopped_early"].startswith("collapse: KL")
    assert manifest["steps"] < 10  # stopped during training, not after it
    # the same run with the alarm off reports the collapse and completes
    recipe = recipe_with_checkup(
        tmp_path, yes_no_model, {"grpo": {**GRPO, "train": {"max_steps": 3, "lr": 1.0, "batch_size": 16}}}, alarm=False
    )
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo-off", recipe_name="tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["checkup"]["collapse"]


def _dpo_on_yes_no(tmp_path, model, name: str, pairs: list[dict], lr: float, steps: int, **checkup) -> Path:
    """A DPO stage on the yes/no model with a checkup; returns its folder (CollapseAlarm propagates)."""
    from align.stages.dpo import run_dpo

    data = write_jsonl(tmp_path / f"{name}.jsonl", pairs)
    stage = {
        "kind": "dpo",
        "data": {"train": str(data)},
        "dpo": {"beta": 0.1},
        "train": {"max_steps": steps, "lr": lr, "batch_size": 4},
    }
    recipe = recipe_with_checkup(tmp_path, model, {"dpo": stage}, **checkup)
    return run_dpo(recipe.resolve("dpo"), tmp_path / name, recipe_name="tiny")


YES_OVER_NO = {"prompt": "Pick one.", "chosen": "yes", "rejected": "no"}


def test_dpo_alarm_stops_training_when_both_answers_fall_together(tmp_path, yes_no_model):
    """Contradictory pairs (yes > no and no > yes) at lr 1.0 cannot separate: by step 3 both answers fell
    12 nats per token, the rejected no further than the chosen (measured). The watch stops training."""
    both_ways = [YES_OVER_NO, {"prompt": "Pick one.", "chosen": "no", "rejected": "yes"}] * 16
    with pytest.raises(CollapseAlarm, match="both pushed down together"):
        _dpo_on_yes_no(tmp_path, yes_no_model, "contradictory", both_ways, lr=1.0, steps=20)
    manifest = json.loads((tmp_path / "contradictory" / "manifest.json").read_text())
    assert manifest["status"] == "collapsed" and manifest["steps"] < 20  # stopped during training


def test_dpo_checkup_judges_the_answers_the_watch_let_through(tmp_path, yes_no_model):
    """yes > no at lr 1.0 with the training watch out of reach (max_chosen_drop 100): every pair ends
    ranked right, but the answers collapsed (empty; KL ~7 per token, the reward 1 -> 0, measured), and
    the checkup stops the stage after its last step. At lr 1e-3 the same data is healthy: complete."""
    with pytest.raises(CollapseAlarm, match="KL to the start"):
        _dpo_on_yes_no(tmp_path, yes_no_model, "wrecked", [YES_OVER_NO] * 32, lr=1.0, steps=20, max_chosen_drop=100)
    manifest = json.loads((tmp_path / "wrecked" / "manifest.json").read_text())
    checkup = manifest["checkup"]
    assert manifest["status"] == "collapsed" and manifest["steps"] == 20  # trained to the end
    assert not any(reason.startswith("during training") for reason in checkup["collapse"])
    assert "held-out reward fell from 1.000 to 0.000" in " ".join(checkup["collapse"])

    out = _dpo_on_yes_no(tmp_path, yes_no_model, "sane", [YES_OVER_NO] * 32, lr=1e-3, steps=6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["checkup"]["collapse"] == []
    assert "notes" not in manifest["checkup"]
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["chosen_logratio_per_token"] > 0 > last["rejected_logratio_per_token"]


def test_a_training_note_is_kept_beside_the_checkup():
    from align.stages.checkup import with_training_alarm

    checkup = {"collapse": [], "after": {}}
    assert with_training_alarm(checkup, None, "step 9: displaced")["notes"] == ["during training: step 9: displaced"]
    assert with_training_alarm(None, "step 3: fell", None) == {"collapse": ["during training: step 3: fell"]}
    assert with_training_alarm(None, None, None) is None


def _watch(**checkup):
    from transformers import TrainerControl, TrainerState

    from align.config import CheckupConfig
    from align.stages.preference import ChosenWatch

    return ChosenWatch(CheckupConfig(**checkup)), TrainerControl(), TrainerState()


def _log(chosen: float, rejected: float, accuracy: float | None = None, prefix: str = "") -> dict:
    """What a DPO log holds for the watch: per-token log-ratios of both sides, the share of pairs ranked right."""
    log = {f"{prefix}chosen_logratio_per_token": chosen, f"{prefix}rejected_logratio_per_token": rejected}
    return log if accuracy is None else {**log, f"{prefix}rewards/accuracies": accuracy}


def test_dpo_watch_lets_a_healthy_displacing_run_through():
    """The run this alarm once stopped (issue 37: held-out accuracy 0.81, loss 0.693 -> 0.581) logged a
    training chosen log-ratio of -0.501 per token; healthy runs measured here fell to -0.31 on a batch
    while the rejected fell further. Far past the threshold (-1.5 per token) with the pairs separating,
    the watch still only notes it; a single bad batch among healthy ones does not stop training."""
    watch, control, state = _watch(max_chosen_drop=0.5)
    for step, (chosen, rejected) in enumerate([(-0.1, -0.2), (-0.501, -0.7), (-1.5, -2.5), (-1.4, -2.4), (-1.6, -2.0)]):
        state.global_step = step + 1
        watch.on_log(None, state, control, logs={"loss": 0.6, **_log(chosen, rejected)})
    watch.on_log(None, state, control, logs=_log(-1.2, -1.9, 0.8, prefix="eval_"))
    assert not control.should_training_stop and watch.reason is None
    assert "likelihood displacement" in watch.note and "fell 1.200" in watch.note  # the largest fall it saw

    watch, control, state = _watch(max_chosen_drop=0.5)
    for chosen, rejected in [(-0.2, -0.4)] * 4 + [(-2.0, -1.9)]:  # one batch in five pushed both down
        watch.on_log(None, state, control, logs=_log(chosen, rejected))
    assert not control.should_training_stop  # the window's means: chosen -0.56, rejected -0.70 (1.25x)


def test_dpo_watch_stops_when_the_pairs_do_not_separate():
    """Far past the threshold with nothing separating - on the held-out pairs at once, on training logs
    through the window's mean - stops training; with checkup.alarm false it only watches."""
    held_out = [_log(-3.0, -4.0, 0.4, prefix="eval_")]  # the rejected fell further, but most pairs rank wrong
    for logs in (held_out, [_log(-0.1, -0.2)] + [_log(-3.0, -2.9)] * 2):
        watch, control, state = _watch(max_chosen_drop=0.5)
        for log in logs:
            watch.on_log(None, state, control, logs=log)
        assert control.should_training_stop and "both pushed down together" in watch.reason, logs
    watch, control, state = _watch(max_chosen_drop=0.5, alarm=False)
    watch.on_log(None, state, control, logs=_log(-3.0, -2.9))
    assert not control.should_training_stop and watch.reason is None


def test_a_collapsed_stage_is_not_an_input(tmp_path, yes_no_model, monkeypatch):
    """align run stops at the collapsed stage; the next run re-makes it rather than building on it."""
    from align.pipeline import Pipeline

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    grpo = {**GRPO, "train": {"max_steps": 10, "lr": 1.0, "batch_size": 16}}
    later = {**GRPO, "from": "grpo", "train": {"max_steps": 1, "lr": 1e-3, "batch_size": 16}}
    recipe = recipe_with_checkup(tmp_path, yes_no_model, {"grpo": grpo, "more": later})
    pipeline = Pipeline(recipe)
    with pytest.raises(CollapseAlarm):
        pipeline.run(pipeline.plan())
    assert not (tmp_path / "runs" / "tiny" / "more").exists()
    plans = Pipeline(recipe).plan()
    assert [p.action for p in plans] == ["run", "run"] and "collapse alarm stopped it" in plans[0].reason


def _watch_on_two_processes(rank: int, init_file: str, results: str) -> None:
    """One of two gloo processes: this process's own DPO stats cross the alarm threshold only on rank 0."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from align.config import CheckupConfig
    from align.stages.preference import ChosenWatch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        watch, control, state = ChosenWatch(CheckupConfig(max_chosen_drop=0.5)), TrainerControl(), TrainerState()
        state.global_step = 7
        healthy, collapsing = _log(-0.1, -0.2), _log(-2.1, -2.0)
        watch.on_log(None, state, control, logs={"loss": 0.6, **healthy})  # both fine
        stopped_early = control.should_training_stop
        watch.on_log(None, state, control, logs=collapsing if rank == 0 else healthy)  # rank 0's mean: -1.1
        Path(f"{results}.{rank}").write_text(json.dumps([stopped_early, control.should_training_stop, watch.reason]))
    finally:
        dist.destroy_process_group()


def test_dpo_alarm_stops_every_process_when_one_crosses_it(tmp_path):
    """Under DDP each process sees its own batches' chosen log-ratio: when one crosses the alarm, every
    process stops at that step (one going on alone would wait in the next gradient all-reduce for ever)."""
    import torch.multiprocessing as mp

    results = str(tmp_path / "result")
    mp.spawn(_watch_on_two_processes, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    first, second = (json.loads(Path(f"{results}.{rank}").read_text()) for rank in (0, 1))
    assert (first[1], second[1]) == (True, True)  # before: only the process that crossed it stopped
    assert (first[0], second[0]) == (False, False)
    assert "fell 1.100 per token" in first[2] and "another process" in second[2]
