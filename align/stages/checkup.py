"""Before and after: what a policy stage did to the model, on held-out prompts of the recipe's task.

Every stage that changes a policy (sft, dpo, grpo, ppo) runs this at its end when the recipe has a
``checkup:`` section, on the model still in memory, before it is saved:
  1. answers  - greedy answers of the trained policy and of its start (the stage it started from, or
                the base with the adapter off) to checkup.prompts, from the hf engine on the policy
                object itself (no export, no second base in memory)
  2. measure  - per model: the verifier's mean reward, the share of answers stuck in a loop, distinct-2,
                mean length, the share cut at max_new_tokens (align/eval/health.py); and the KL per token
                from the start, exact over the vocabulary, on the trained policy's answers
  3. general  - the general-ability probe (align/eval/general_probe.py): log-likelihood of reference
                texts of other kinds under the start, the end and the base, and a greedy answer to the
                first of each kind before and after: what the stage cost outside its task
  4. verdict  - a table before -> after; past a threshold (KL, loops, reward, general ability) the stage is marked
                collapsed, not complete, and stops the pipeline with the reasons (checkup.alarm: false
                reports without stopping)
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from align.config import StageConfig
from align.console import console
from align.data.prompt_data import PromptExample, concatenate, encode_prompt_files
from align.eval.general_probe import probe_reason
from align.eval.health import collapse_reasons, degeneration
from align.models.adapters import reference_mode
from align.models.loading import autocast
from align.rollout.engine import Rollout, Sampling
from align.rollout.scoring import completion_forward, rollout_batch

START_ADAPTER = "checkup_start"


class CollapseAlarm(RuntimeError):
    """A stage made the model measurably worse on the recipe's task; its folder is marked collapsed."""


def checkup_prompts(cfg: StageConfig, tokenizer) -> dict[str, list[PromptExample]]:
    """{set name: prompts} (read with the stage's own prompt rules; bad rows stop the stage); one set
    named task unless checkup.prompts names several."""
    c = cfg.checkup
    sets = {}
    for name, files in c.prompt_sets().items():
        prompts, report = encode_prompt_files(
            files, tokenizer, cfg.data.model_copy(update={"max_length": 10**6}), "checkup"
        )
        report.raise_if_bad()
        sets[name] = prompts[: c.max_prompts]
    return sets


@torch.no_grad()
def run_checkup(cfg: StageConfig, model, tokenizer, source: Path | None, precision: str) -> dict | None:
    """{"before", "after", "kl_per_token", "collapse": [reasons], "prompts", "settings", "sets"}, or None
    without a checkup section. before / after are the first set's (the task); "sets" holds every set's,
    and the alarm reads each of them (a stage can gain on its task and lose on another form of it).

    ``source`` is the stage the policy started from (its adapter is loaded beside the trained one
    for the comparison and removed again); None means the start is the base with the adapter off.
    """
    from align.rollout.hf import HFEngine
    from reward_models import build_reward

    c = cfg.checkup
    if not c.prompts:
        return None
    if not hasattr(model, "disable_adapter"):
        console.print("[yellow]checkup skipped: full fine-tuning keeps no start to compare with in memory[/]")
        return None
    started = time.time()
    sets = checkup_prompts(cfg, tokenizer)
    prompts, spans = concatenate(sets)
    reward = build_reward(c.reward, trust_remote_code=cfg.model.trust_remote_code) if c.reward is not None else None
    was_training = model.training
    engine = HFEngine(model, tokenizer, precision, batch_size=len(prompts))
    settings = Sampling(temperature=0.0, max_new_tokens=c.max_new_tokens, seed=cfg.seed)
    conversations = [p.messages for p in prompts]
    settings_record = settings_of(c)
    earlier = _checkup_of(source)
    try:
        if earlier is None or earlier.get("settings") != settings_record:
            with start_policy(model, source):
                start_answers = engine.generate(conversations, settings)
        model.eval()
        answers = engine.generate(conversations, settings)
        kl = kl_per_token(model, source, answers, tokenizer.pad_token_id, precision)
        general = (
            general_probe(cfg, model, tokenizer, source, precision, engine, settings, earlier) if c.general else None
        )
    finally:
        if START_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(START_ADAPTER)
        model.train(was_training)
    # The start is the stage it started from, whose own checkup measured these answers as its end.
    reused = earlier is not None and earlier.get("settings") == settings_record
    measured = {}
    for name, span in spans.items():
        if reused:
            before = earlier["sets"][name]["after"] if "sets" in earlier else earlier["after"]
        else:
            before = measure(start_answers[span], reward, prompts)  # answers know their prompt's index in prompts
        after = measure(answers[span], reward, prompts)
        measured[name] = {"prompts": span.stop - span.start, "before": before, "after": after}
    reasons = set_reasons(measured, kl if cfg.CHECKUP_KL_ALARM else None, c)
    if general is not None and (reason := probe_reason(general, c.max_general_drop)):
        reasons.append(reason)
    task = next(iter(measured.values()))
    result = {
        "prompts": len(prompts),
        "before": task["before"],
        "after": task["after"],
        "sets": measured,
        "general": general,
        "kl_per_token": kl,
        "collapse": reasons,
        "start": str(source) if source else "base (adapter off)",
        "seconds": round(time.time() - started, 1),
        "before_from": "the start stage's own checkup" if reused else "measured now",
        "settings": settings_record,
        "examples": [
            {"prompt": p.messages[-1]["content"], "after": a.text} for p, a in list(zip(prompts, answers))[:3]
        ],
    }
    print_checkup(cfg.kind, result)
    return result


def settings_of(c) -> dict:
    """The checkup settings its answers depend on: a start stage's checkup is reused only when they match."""
    return c.model_dump(mode="json", include={"prompts", "sets", "max_prompts", "reward", "max_new_tokens"})


def set_reasons(measured: dict[str, dict], kl: float | None, c) -> list[str]:
    """The collapse reasons of every set ({name: {"before", "after"}}), each named by its set when
    there are several; the KL (one number, over every set's answers) is judged once.

    >>> from align.config import CheckupConfig
    >>> fine = {"reward": 0.5, "loop_fraction": 0.0, "truncated_fraction": 0.0}
    >>> fell = {**fine, "reward": 0.1}
    >>> set_reasons({"task": {"before": fine, "after": fine}, "reworded": {"before": fine, "after": fell}},
    ...             0.2, CheckupConfig())
    ['set reworded: held-out reward fell from 0.500 to 0.100 (threshold -0.15)']
    >>> set_reasons({"task": {"before": fine, "after": fell}}, 2.0, CheckupConfig())
    ['KL to the start 2.000 per token (threshold 1.0)', 'held-out reward fell from 0.500 to 0.100 (threshold -0.15)']
    """
    thresholds = dict(
        max_loop_rise=c.max_loop_rise, max_cutoff_rise=c.max_cutoff_rise, max_reward_drop=c.max_reward_drop
    )
    first = next(iter(measured.values()))
    reasons = collapse_reasons(first["before"], first["before"], kl, max_kl=c.max_kl, **thresholds)  # the KL alone
    for name, m in measured.items():
        found = collapse_reasons(m["before"], m["after"], None, max_kl=c.max_kl, **thresholds)
        reasons += [f"set {name}: {r}" if len(measured) > 1 else r for r in found]
    return reasons


def general_probe(
    cfg: StageConfig, model, tokenizer, source: Path | None, precision: str, engine, settings, earlier: dict | None
) -> dict:
    """{"before", "after", "base": {kind: log-likelihood per token, "mean"}, "examples"}: the reference
    texts under the stage's start, its end and the base (adapters off), and greedy answers to the first
    prompt of each kind from the start and the end. The start's numbers and answers are the start
    stage's own checkup's end when it probed the same texts (as the task's before is)."""
    from align.eval.general_probe import first_prompts, log_likelihood, probe_texts

    c = cfg.checkup
    texts = probe_texts(c.general, tokenizer, c.general_rows)
    rows = {kind: len(examples) for kind, examples in texts.items()}
    pad = tokenizer.pad_token_id
    firsts = first_prompts(c.general)
    known = (earlier or {}).get("general") or {}
    if known.get("texts") == c.general and known.get("rows") == rows and earlier.get("settings") == settings_of(c):
        before, base = known["after"], known["base"]
        said_before = [e["after"] for e in known["examples"]]
    else:
        with start_policy(model, source):
            before = log_likelihood(model, texts, pad, precision)
            said_before = [a.text for a in engine.generate(list(firsts.values()), settings)]
        if source is None:
            base = before
        else:
            with reference_mode(model, None):
                base = log_likelihood(model, texts, pad, precision)
    model.eval()
    after = log_likelihood(model, texts, pad, precision)
    said_after = engine.generate(list(firsts.values()), settings)
    return {
        "texts": c.general,
        "rows": rows,
        "before": before,
        "after": after,
        "base": base,
        "examples": [
            {"kind": kind, "prompt": prompt[-1]["content"], "before": b, "after": a.text}
            for (kind, prompt), b, a in zip(firsts.items(), said_before, said_after)
        ],
    }


def _checkup_of(source: Path | None) -> dict | None:
    """The checkup a finished start stage recorded in its manifest (None for the base, or none made)."""
    if source is None or not (source / "manifest.json").is_file():
        return None
    return json.loads((source / "manifest.json").read_text(encoding="utf-8")).get("checkup")


def measure(answers: list[Rollout], reward, prompts: list[PromptExample]) -> dict[str, float]:
    from align.stages.rollouts import score

    stats = degeneration([a.completion_ids for a in answers], [a.truncated for a in answers])
    stats["reward"] = score(reward, prompts, answers).mean().item() if reward is not None else None
    return stats


@contextmanager
def start_policy(model, source: Path | None):
    """The policy as the stage found it: the starting stage's adapter, or the base with adapters off."""
    if source is not None and START_ADAPTER not in model.peft_config:
        model.load_adapter(str(source / "adapter"), adapter_name=START_ADAPTER, is_trainable=False)
    with reference_mode(model, START_ADAPTER if source is not None else None):
        yield


def kl_per_token(
    model, source: Path | None, answers: list[Rollout], pad_id: int, precision: str, batch_size: int = 8
) -> float:
    """Mean over the answers' tokens of KL(policy || start) of the next-token distributions, summed
    exactly over the vocabulary (not a sampled estimate: greedy answers would bias one)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(answers), batch_size):
        chunk = [a for a in answers[i : i + batch_size] if a.completion_ids]
        if not chunk:
            continue
        batch = {k: v.to(device) for k, v in rollout_batch(chunk, pad_id).items()}
        policy = completion_logprobs(model, batch, precision)
        with start_policy(model, source):
            start = completion_logprobs(model, batch, precision)
        mask = batch["completion_mask"].float()
        per_token = (policy.exp() * (policy - start)).sum(-1)
        total += (per_token * mask).sum().item()
        tokens += int(mask.sum().item())
    return total / max(tokens, 1)


def completion_logprobs(model, batch: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    """Log-softmax over the vocabulary at each completion position, [B, C, V] in fp32."""
    with autocast(precision):
        logits = completion_forward(model, batch)[0]
    return logits.float().log_softmax(-1)


def print_checkup(kind: str, result: dict) -> None:
    before, after = result["before"], result["after"]
    rows = [
        ("reward", "reward", "{:.3f}"),
        ("in a loop", "loop_fraction", "{:.2f}"),
        ("distinct-2", "distinct_2", "{:.3f}"),
        ("length (tokens)", "length_mean", "{:.1f}"),
        ("cut off", "truncated_fraction", "{:.2f}"),
    ]
    console.print(
        f"checkup of {kind} on {result['prompts']} held-out prompts (greedy, {result['seconds']:.0f}s), start -> end; "
        f"KL to start {result['kl_per_token']:.4f} per token"
    )
    sets = result.get("sets") or {"task": {"before": before, "after": after}}
    for name, measured in sets.items():
        if len(sets) > 1:
            console.print(f"  set {name} ({measured['prompts']} prompts)")
        for label, key, fmt in rows:
            was, now = measured["before"], measured["after"]
            if was.get(key) is not None:
                console.print(f"  {label:<16} {fmt.format(was[key])} -> {fmt.format(now[key])}")
    general = result.get("general")
    if general:
        kinds = ", ".join(f"{k} {general['after'][k] - general['before'][k]:+.3f}" for k in general["rows"])
        console.print(
            f"  general ability   {general['before']['mean']:.3f} -> {general['after']['mean']:.3f} log-likelihood "
            f"per token of reference texts (base {general['base']['mean']:.3f}; by kind: {kinds})"
        )
    for reason in result["collapse"]:
        console.print(f"[bold red]collapse: {reason}[/]")


def with_training_alarm(result: dict | None, reason: str | None, note: str | None = None) -> dict | None:
    """The checkup's result with the training loop's own collapse reason (RL: CollapseWatch, DPO and KTO:
    ChosenWatch) added, and a note of what it saw that is not a collapse (``notes``, printed in yellow)."""
    if not reason and not note:
        return result
    result = result or {"collapse": []}
    if reason:
        result["collapse"] = [f"during training: {reason}", *result["collapse"]]
    if note:
        result["notes"] = [*result.get("notes", []), f"during training: {note}"]
        console.print(f"[yellow]note: during training: {note}[/]")
    return result


def checkup_status(cfg: StageConfig, result: dict | None) -> str:
    """The manifest status a stage gets: complete, or collapsed when the alarm is on and went off."""
    return "collapsed" if result and result["collapse"] and cfg.checkup.alarm else "complete"


def raise_if_collapsed(cfg: StageConfig, result: dict | None, output_dir: Path) -> None:
    if checkup_status(cfg, result) == "collapsed":
        raise CollapseAlarm(
            f"{cfg.kind} stage stopped by the collapse alarm ({output_dir}): "
            + "; ".join(result["collapse"])
            + ". Its folder is kept for inspection and marked collapsed; lower train.lr (or raise the KL weight), "
            "or set checkup.alarm=false to accept it"
        )
