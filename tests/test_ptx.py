"""The ptx term of grpo and ppo (InstructGPT's PPO-ptx, align/stages/ptx.py), on tiny models: what it
keeps, its exact loss, the rows each optimizer step reads, and its errors.

``yes_no_model`` (conftest) answers "Pick one." with yes or no; rewarded for "yes", RL narrows it: it
also grows less likely to answer "no" to other yes/no questions (the alignment tax, in miniature).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from test_checkup import GRPO, recipe_with_checkup

from align.config import RecipeError
from align.data.loading import DataError


def _questions(path, questions: list[str]):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "no"}]} for q in questions]
    return write_jsonl(path, rows)


def _general_tax(tmp_path, model, ptx: dict | None) -> tuple[dict, list[dict]]:
    """A narrow GRPO run (paid for "yes", lr 1e-2) with the probe on other questions answered "no";
    returns (the manifest's checkup, the logged steps)."""
    from align.stages.grpo import run_grpo

    tmp_path.mkdir()
    probe = _questions(tmp_path / "probe.jsonl", ["Is the sky green?", "Is ice hot?", "Can fish fly?", "Is 7 even?"])
    stage = {**GRPO, "grpo": {"kl_coef": 0.0}, "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 16}}
    if ptx:
        stage["ptx"] = ptx
    recipe = recipe_with_checkup(tmp_path, model, {"grpo": stage}, general=str(probe), alarm=False)
    out = run_grpo(recipe.resolve("grpo"), tmp_path / "grpo", recipe_name="tiny")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "manifest.json").read_text())["checkup"], logged


def test_ptx_keeps_general_answers_likely_while_rl_still_learns_its_task(tmp_path, yes_no_model):
    """Without ptx the narrow run costs the probe's "no" answers (its tax); with the SFT loss of other
    questions answered "no" mixed in (none of them the probe's), the probe falls less - while the task
    reward still goes 0 -> 1 and the ptx loss itself falls. With ptx off nothing is logged of it."""
    ptx_data = _questions(
        tmp_path / "ptx.jsonl", ["Is snow black?", "Is fire cold?", "Can rocks swim?", "Is 9 even?", "Is the sun blue?"]
    )
    plain, plain_log = _general_tax(tmp_path / "plain", yes_no_model, None)
    mixed, mixed_log = _general_tax(tmp_path / "mixed", yes_no_model, {"coef": 1.0, "data": str(ptx_data), "rows": 4})
    fall = lambda checkup: checkup["general"]["before"]["mean"] - checkup["general"]["after"]["mean"]  # noqa: E731
    tax = {"plain": fall(plain), "mixed": fall(mixed)}
    # measured: plain 0.181, mixed -0.123 (the probe's "no" grew likelier); ptx loss 0.473 -> 0.338
    assert tax["plain"] > 0.1 and tax["mixed"] < tax["plain"] - 0.1, tax
    assert plain["after"]["reward"] == mixed["after"]["reward"] == 1.0, (plain, mixed)
    assert "ptx_nll" not in plain_log[0] and mixed_log[-1]["ptx_nll"] < mixed_log[0]["ptx_nll"], mixed_log


def _term(tmp_path, model_dir, data_rows: list[dict], **ptx):
    from align.models.loading import load_tokenizer
    from align.stages.ptx import PtxTerm

    tmp_path.mkdir(exist_ok=True)
    data = write_jsonl(tmp_path / "ptx.jsonl", data_rows)
    stage = {**GRPO, "ptx": {"coef": 0.5, "data": str(data), **ptx}, "train": {"batch_size": 2}}
    cfg = recipe_with_checkup(tmp_path, model_dir, {"grpo": stage}).resolve("grpo")
    return PtxTerm(cfg, load_tokenizer(cfg.model)), cfg


def _chat(*turns: str) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


TALK = [
    _chat("Hi", "Hello there, friend."),
    _chat("Name a colour.", "Blue"),
    _chat("Count to three.", "One, two, three."),
    _chat("Is it late?", "A little."),
    _chat("What is two and two?", "Four.", "Sure?", "Yes, quite sure of it."),
]


def test_the_ptx_gradient_is_coef_times_the_sft_loss_of_the_steps_rows(tmp_path, tiny_llama):
    """Exact cross-check: the term's backward (micro-batches of 2 padded rows, the labelled positions'
    logits only) gives the gradients of coef x (sum of -log p over the step's labelled tokens / their
    count), computed here from a full forward of each row alone; it returns that mean -log p."""
    from transformers import AutoModelForCausalLM

    term, cfg = _term(tmp_path, tiny_llama, TALK, rows=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    measured = term.backward(model, 3, "fp32")
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = term.rows(3)
    tokens = sum(r.trained_tokens for r in rows)
    nll = 0.0
    for row in rows:
        logprobs = model(torch.tensor([row.input_ids])).logits[0, :-1].log_softmax(-1)
        labels = torch.tensor(row.labels[1:])
        scored = labels != -100
        nll = nll - logprobs[scored].gather(-1, labels[scored].unsqueeze(-1)).sum()
    (0.5 * nll / tokens).backward()
    assert measured == pytest.approx(nll.item() / tokens, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_each_optimizer_step_reads_the_next_rows_of_a_seeded_pass(tmp_path, tiny_llama):
    """Every pass over the ptx rows reads each row once, in a new seeded order; the rows of step u depend
    on u alone (a resumed run, or another process, reads what the uninterrupted one read)."""
    term, _ = _term(tmp_path, tiny_llama, TALK, rows=2)
    ids = lambda rows: [tuple(r.input_ids) for r in rows]  # noqa: E731
    steps = [ids(term.rows(u)) for u in range(10)]  # 20 rows = 4 passes over 5
    passes = [sum(steps, [])[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(p) == sorted(ids(term.examples)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    fresh, _ = _term(tmp_path / "again", tiny_llama, TALK, rows=2)
    assert ids(fresh.rows(7)) == steps[7] and ids(fresh.rows(2)) == steps[2]


def test_ptx_settings_and_rows_are_checked_before_any_model_loads(tmp_path, tiny_llama, monkeypatch):
    """coef without data, data without coef: the recipe is refused when read. A bad ptx row stops the
    stage naming its file, row and field before the policy loads; the plan names the term."""
    import align.stages.grpo as grpo

    for ptx, words in (({"coef": 0.1}, "needs ptx.data"), ({"data": "x.jsonl"}, "only with ptx.coef > 0")):
        with pytest.raises(RecipeError, match=words):
            recipe_with_checkup(tmp_path, tiny_llama, {"grpo": {**GRPO, "ptx": ptx}})
    bad = write_jsonl(tmp_path / "bad.jsonl", [TALK[1], {"messages": [{"role": "user", "content": 3}]}])
    cfg = recipe_with_checkup(tmp_path, tiny_llama, {"grpo": {**GRPO, "ptx": {"coef": 0.1, "data": str(bad)}}})
    # `align run`'s plan reads them too, so a bad ptx file stops a recipe before its earlier stages run
    from align.models.loading import load_tokenizer
    from align.stages.rl_setup import plan

    resolved = cfg.resolve("grpo")
    with pytest.raises(DataError, match="bad.jsonl, row 2"):
        plan(resolved, load_tokenizer(resolved.model))
    monkeypatch.setattr(grpo, "load_policy", lambda *a, **k: pytest.fail("the policy loaded before the data check"))
    with pytest.raises(DataError, match=r"(?s)ptx.data: 1 bad row.*bad\.jsonl, row 2, field 'messages\[0\]\.content'"):
        grpo.run_grpo(cfg.resolve("grpo"), tmp_path / "out", recipe_name="tiny")


def test_each_optimizer_step_hands_ptx_its_own_number():
    """minibatch_updates numbers a stage's optimizer steps 0, 1, 2, ... for the ptx term across steps,
    epochs and minibatches, so every optimizer step reads new ptx rows (a constant number would train on
    the same rows forever and still pass the torchrun and resume tests, which compare runs)."""
    from types import SimpleNamespace

    from align.stages.rl_update import minibatch_updates

    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cfg = SimpleNamespace(seed=0, train=SimpleNamespace(batch_size=2, max_grad_norm=1.0))
    log = SimpleNamespace(add=lambda **values: None)
    seen = []
    for step in (1, 2):  # 2 steps x 2 epochs x 2 minibatches of 4 rows
        minibatch_updates(
            torch.ones(8, 3),
            None,
            lambda rows, tokens, size: (0.0, 0.0),
            epochs=2,
            minibatch=4,
            cfg=cfg,
            step=step,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            log=log,
            ptx=lambda update: seen.append(update) or 1.0,
        )
    assert seen == list(range(8))
