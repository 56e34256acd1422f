"""`align eval`: the win-rate of a policy against baselines on held-out prompts.

1. check   - prompts of every held-out set (row reports), judges and every model folder, before
             any model loads
2. sample  - one answer per prompt from the policy and from each baseline, all with the same
             sampling settings and seed, one model in memory at a time (every set's prompts at once);
             a best-of-n baseline draws n answers per prompt and keeps the one its reward scores highest
3. judge   - per judge and baseline, prompt by prompt: a pairwise LLM judge reads both answers in
             both orders (P(policy better), position bias); any other reward scores both answers
             and the higher score wins (differences within tie_margin are ties)
4. report  - per set, judge and baseline: win / tie / loss, win-rate with a bootstrap 95% interval,
             length-controlled win-rate; samples.jsonl, report.json / .md / .png, the manifest last

Named sets (data.eval: {name: file}) are reported apart because a policy can gain on the form of
the questions it trained on and lose on another form of the same questions; one pooled number
would hide the loss.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from align.artifacts import stage_folder, write_atomic, write_manifest
from align.config import BestOfBaseline, DataConfig, EvalConfig, RecipeError, reward_parts
from align.console import console, print_plan
from align.data.loading import DataError
from align.data.prompt_data import PromptExample, concatenate, encode_prompt_files
from align.data.report import RowReport
from align.eval.report import print_table, write_report
from align.eval.winrate import outcomes_from_probabilities, outcomes_from_scores, summarize
from align.models.loading import load_base_model, load_tokenizer, read_stage_manifest, resolve_precision
from align.models.resolve import resolve_model
from align.rollout.engine import Rollout, Sampling
from align.rollout.scoring import logprob_mismatch, score_rollouts
from align.stages.common import elsewhere, prepare_output, process_state, referenced_dirs
from align.stages.rollouts import rollout_engine, score


@dataclass
class Contestant:
    """The policy or a baseline: ``name`` as the recipe or command line gives it, ``folder`` what is loaded."""

    name: str
    folder: Path
    description: str
    is_base: bool = False  # the recipe's model itself, loaded as the stages load their base
    best_of: int = 1  # answers drawn per prompt; the one ``reward`` scores highest is kept
    reward: Any = None


def plan(cfg: EvalConfig, tokenizer) -> tuple[str, str]:
    """(prompts, work) for `align run`'s plan; reading every prompt is the validation."""
    sets = held_out_sets(cfg.data, tokenizer)
    n = sum(len(prompts) for prompts, _ in sets.values())
    named = f" in {len(sets)} sets" if len(sets) > 1 else ""
    draws = 1 + sum(1 if isinstance(b, str) else b.best_of for b in cfg.baselines)
    return f"{n} prompts{named}", f"{n} answers x {draws} draws ({1 + len(cfg.baselines)} models)"


def run_eval(
    cfg: EvalConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
) -> Path:
    from reward_models import build_reward
    from reward_models.judge import Verdicts

    started = time.time()
    output_dir = Path(output_dir)
    if elsewhere(process_state()):  # one process runs this stage
        return output_dir

    # 1. Check everything before any model loads: prompts, judges, the policy and baselines.
    base_path = resolve_model(cfg.model.name, cfg.model.revision)
    sets = held_out_sets(cfg.data, load_tokenizer(cfg.model, base_path))
    prompts, spans = concatenate({name: set_prompts for name, (set_prompts, _) in sets.items()})
    stage_dirs = referenced_dirs(cfg, recipe_name)
    for name, spec in cfg.judges.items():
        check_judge(name, spec, stage_dirs, prompts)
    for baseline in cfg.baselines:
        if isinstance(baseline, BestOfBaseline):
            check_judge(baseline.label, baseline.reward, stage_dirs, prompts)
    if cfg.policy is None:
        raise RecipeError("eval: no policy to evaluate (set policy: <stage or folder>)")
    policy = locate(cfg.policy, cfg, recipe_name, base_path)
    baselines = [contestant(baseline, cfg, recipe_name, base_path) for baseline in cfg.baselines]
    contestants = [policy, *baselines]
    check_distinct(contestants)
    prepare_output(process_state(), output_dir, cfg, overwrite, resume, together=False)
    r = cfg.rollout
    print_plan(
        f"align eval - {recipe_name}",
        {
            "policy": f"{policy.name}: {policy.description}",
            "baselines": "; ".join(f"{b.name}: {b.description}" for b in baselines),
            "judges": "; ".join(f"{name} ({spec_text(spec)})" for name, spec in cfg.judges.items()),
            **{
                f"data {name}" if len(sets) > 1 else "data eval": f"{rows.summary()}; {len(ps)} prompts evaluated"
                for name, (ps, rows) in sets.items()
            },
            "sampling": f"engine {r.engine}, temperature {r.temperature}, top_p {r.top_p}, top_k {r.top_k}, "
            f"<= {r.max_new_tokens} new tokens, seed {cfg.seed}; the same for every model",
            "statistics": f"ties within {cfg.tie_margin}; 95% interval from {cfg.bootstrap} bootstrap resamples of the "
            "prompts",
            "output": str(output_dir),
        },
    )

    # 2. Sample one answer per prompt from each model, with identical settings and seed.
    precision = resolve_precision(cfg.model.precision)
    settings = Sampling(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=tuple(r.stop),
        seed=cfg.seed,
    )
    answers, engines, fidelity, picked = {}, {}, {}, {}
    for who in contestants:
        answers[who.name], engines[who.name], fidelity[who.name] = generate(who, cfg, prompts, settings, precision)
        if who.best_of > 1:
            answers[who.name], picked[who.name] = best_answers(who, answers[who.name], prompts, stage_dirs, cfg)
    mine = answers[policy.name]

    # 3. Judge the policy's answer against each baseline's, prompt by prompt.
    results, verdicts = [], {}
    for judge_name, spec in cfg.judges.items():
        try:
            judge = build_reward(spec, stage_dirs, cfg.model.trust_remote_code)
        except KeyError as err:
            raise RecipeError(f"judge '{judge_name}': {err.args[0]}") from None
        console.print(f"judging with {judge_name} ({judge.name})")
        pairwise = isinstance(judge, Verdicts) and judge.mode == "pairwise"
        scores = {} if pairwise else {name: score(judge, prompts, answers[name]).tolist() for name in answers}
        verdicts[judge_name] = {}
        for baseline in baselines:
            theirs = answers[baseline.name]
            verdicts[judge_name][baseline.name] = []
            for set_name, span in spans.items():
                if pairwise:  # both orders; P(policy's answer better); position bias per set
                    p = judge.compare(
                        [x.messages for x in prompts[span]],
                        [a.text for a in mine[span]],
                        [a.text for a in theirs[span]],
                    )
                    outcomes, bias = outcomes_from_probabilities(p), judge.last_position_bias
                    per_prompt = [{"p_policy_wins": v} for v in p]
                else:
                    ours, others = scores[policy.name][span], scores[baseline.name][span]
                    outcomes, bias = outcomes_from_scores(ours, others, cfg.tie_margin), None
                    per_prompt = [{"policy": a, "baseline": b} for a, b in zip(ours, others)]
                verdicts[judge_name][baseline.name] += [
                    {"outcome": float(o), **d} for o, d in zip(outcomes, per_prompt)
                ]
                lengths = [len(a.completion_ids) for a in mine[span]], [len(a.completion_ids) for a in theirs[span]]
                results.append(
                    {
                        "set": set_name,
                        "judge": judge_name,
                        "baseline": baseline.name,
                        **summarize(outcomes, *lengths, resamples=cfg.bootstrap, seed=cfg.seed),
                        "position_bias": bias,
                    }
                )
        del judge
        free_memory()

    # 4. Samples and report, then the manifest: written last, it says the evaluation is complete.
    set_of = {i: name for name, span in spans.items() for i in range(len(prompts))[span]}
    samples = [
        {
            "index": i,
            "set": set_of[i],
            "prompt": p.messages,
            "policy": mine[i].text,
            "baselines": {b.name: answers[b.name][i].text for b in baselines},
            "lengths": {name: len(answers[name][i].completion_ids) for name in answers},
            "judges": {j: {b: v[i] for b, v in by_baseline.items()} for j, by_baseline in verdicts.items()},
        }
        for i, p in enumerate(prompts)
    ]
    write_atomic(output_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    models = {
        c.name: {
            "name": c.name,
            "path": str(c.folder),
            "description": c.description,
            "engine": engines[c.name],
            "engine_trainer_mismatch": fidelity[c.name],
            **({"best_of": c.best_of, "picked_by": _written(c.reward), **picked[c.name]} if c.best_of > 1 else {}),
        }
        for c in contestants
    }
    report = {
        "policy": models[policy.name],
        "baselines": [models[b.name] for b in baselines],
        "judges": {name: _written(spec) for name, spec in cfg.judges.items()},
        "sampling": {
            "engine": r.engine,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "top_k": r.top_k,
            "max_new_tokens": r.max_new_tokens,
            "stop": r.stop,
            "seed": cfg.seed,
        },
        "prompts": {
            "n": len(prompts),
            "files": cfg.data.eval,
            "sets": {
                name: {"n": len(ps), "files": cfg.data.held_out_sets()[name], "rows": rows.as_dict()}
                for name, (ps, rows) in sets.items()
            },
        },
        "tie_margin": cfg.tie_margin,
        "bootstrap": cfg.bootstrap,
        "length_unit": "tokens",
        "results": results,
    }
    write_report(output_dir, report, samples, cfg.examples)
    track_results(cfg, output_dir, recipe_name, results, samples)
    write_manifest(
        output_dir,
        status="complete",
        artifact="report",
        stage="eval",
        kind="eval",
        recipe=recipe_name,
        base_model=cfg.model.name,
        seconds=round(time.time() - started, 1),
        policy=report["policy"],
        baselines=report["baselines"],
        results=results,
        **(provenance or {}),
    )
    print_table(report)
    console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir / 'report.md'}")
    return output_dir


# The report's figures that go to wandb / trackio, as judge/baseline/figure (set/judge/baseline/figure
# when the report has several held-out sets).
TRACKED_FIGURES = ("win_rate", "ci_low", "ci_high", "lc_win_rate", "wins", "ties", "losses", "position_bias")


def track_results(cfg: EvalConfig, output_dir: Path, recipe_name: str, results: list[dict], samples: list[dict]):
    """The win-rates and every prompt's answers (a table) to wandb / trackio, when tracking is on."""
    from align.tracking import Tracker

    tracker = Tracker(cfg.tracking, output_dir, f"{recipe_name}/eval", cfg.model_dump(mode="json", by_alias=True))
    try:
        several = len({r["set"] for r in results}) > 1
        figures = {
            f"{r['set'] + '/' if several else ''}{r['judge']}/{r['baseline']}/{key}": r[key]
            for r in results
            for key in TRACKED_FIGURES
            if r[key] is not None
        }
        tracker.log(figures)
        baselines = list(samples[0]["baselines"]) if samples else []
        rows = [[s["set"], s["prompt"][-1]["content"], s["policy"], *s["baselines"].values()] for s in samples]
        tracker.table("samples", ["set", "prompt", "policy", *baselines], rows)
    finally:
        tracker.close()


def held_out_sets(data: DataConfig, tokenizer) -> dict[str, tuple[list[PromptExample], RowReport]]:
    """{set name: (prompts, row report)} for every held-out set, each capped at data.max_eval_rows."""
    sets = {}
    for name, files in data.held_out_sets().items():
        try:
            sets[name] = held_out_prompts(data.model_copy(update={"eval": files, "eval_sets": {}}), tokenizer)
        except DataError as err:
            if not data.eval_sets:
                raise
            raise DataError(f"held-out set {name!r}: {err}") from None
    return sets


def held_out_prompts(data: DataConfig, tokenizer) -> tuple[list[PromptExample], RowReport]:
    """data.eval's prompts, in file order, capped at data.max_eval_rows; strict mode stops on a bad row.

    The held-out half of ``load_prompts`` without its training half: an eval stage has no data.train.
    """
    prompts, rows = encode_prompt_files(data.eval, tokenizer, data, "eval")
    if data.on_bad_rows == "error":
        rows.raise_if_bad()
    prompts = prompts[: data.max_eval_rows] if data.max_eval_rows else prompts
    if not prompts:
        raise DataError(f"no prompts to evaluate ({rows.summary()})")
    return prompts, rows


def check_folder(folder: Path) -> dict:
    """The manifest of a finished stage folder ({} for a plain model folder), checked without loading
    weights: a missing folder, an unfinished stage or a folder holding neither is an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if (folder / "manifest.json").is_file():
        manifest = read_stage_manifest(folder)
        if manifest.get("status") != "complete":
            raise FileNotFoundError(f"{folder}: the stage did not finish (status {manifest.get('status')!r})")
        return manifest
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder}: this stage has not finished (no manifest.json); finish it first (--resume)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: neither a finished stage folder (manifest.json) nor a model folder (config.json)"
        )
    return {}


def locate(name: str, cfg: EvalConfig, recipe_name: str, base_path: Path) -> Contestant:
    """'base' is the recipe's model; a bare name is a stage of this recipe (runs/<recipe>/<name>);
    anything with a path separator is a folder."""
    if name == "base":
        return Contestant(name, base_path, f"the base model {cfg.model.name}, no adapter", is_base=True)
    is_stage = "/" not in name and os.sep not in name
    folder = stage_folder(recipe_name, name) if is_stage else Path(name).expanduser()
    if is_stage and not folder.exists():
        raise FileNotFoundError(
            f"{name}: {folder} does not exist; run stage '{name}' first (a folder is named with a path, e.g. ./{name})"
        )
    manifest = check_folder(folder)
    if manifest.get("kind") == "rm":
        raise RecipeError(
            f"{name}: {folder} is a reward model; it judges answers ({{type: learned, ...}}) rather than giving them"
        )
    if not manifest:
        return Contestant(name, folder, f"model folder {folder}")
    return Contestant(
        name,
        folder,
        f"{manifest.get('kind')} stage {folder} ({manifest.get('artifact')} on {manifest.get('base_model')})",
    )


def contestant(baseline: str | BestOfBaseline, cfg: EvalConfig, recipe_name: str, base_path: Path) -> Contestant:
    """A baseline as run_eval compares it: a stage, folder or the base, or best-of-n answers of one."""
    if isinstance(baseline, str):
        return locate(baseline, cfg, recipe_name, base_path)
    source = locate(baseline.from_stage, cfg, recipe_name, base_path)
    return Contestant(
        baseline.label,
        source.folder,
        f"the best of {baseline.best_of} answers of {source.name} by {spec_text(baseline.reward)} "
        f"({source.description})",
        is_base=source.is_base,
        best_of=baseline.best_of,
        reward=baseline.reward,
    )


def best_answers(
    who: Contestant, drawn: list[Rollout], prompts: list[PromptExample], stage_dirs: dict[str, Path], cfg: EvalConfig
) -> tuple[list[Rollout], dict]:
    """Per prompt, the answer of ``drawn`` (best_of per prompt) that who.reward scores highest (the first
    of equals: draws are i.i.d.), in prompt order; and what the picking did: the reward's mean over the
    picked answers and over every draw."""
    from reward_models import build_reward

    reward = build_reward(who.reward, stage_dirs, cfg.model.trust_remote_code)
    console.print(f"{who.name}: picking the best of {who.best_of} answers per prompt by {getattr(reward, 'name', '')}")
    values = score(reward, prompts, drawn).tolist()
    del reward
    free_memory()
    best: dict[int, tuple[float, Rollout]] = {}
    for rollout, value in zip(drawn, values):
        if rollout.prompt_index not in best or value > best[rollout.prompt_index][0]:
            best[rollout.prompt_index] = (value, rollout)
    if sorted(best) != list(range(len(prompts))):
        raise RuntimeError(f"{who.name}: the engine answered {len(best)} of {len(prompts)} prompts")
    kept = [best[i] for i in range(len(prompts))]
    return [rollout for _, rollout in kept], {
        "picked_reward_mean": sum(v for v, _ in kept) / len(kept),
        "drawn_reward_mean": sum(values) / len(values),
    }


def check_distinct(contestants: list[Contestant]) -> None:
    """Two names for one model (a baseline folder that is the base, a stage named twice) would be a
    comparison with itself: half ties, half coin flips, and no error to say why. A best-of-n baseline
    of a model is another contestant than the model."""
    seen: dict[tuple, str] = {}
    for contestant in contestants:
        key = (
            contestant.folder.resolve(),
            contestant.best_of,
            spec_text(contestant.reward) if contestant.reward else "",
        )
        other = seen.setdefault(key, contestant.name)
        if other != contestant.name:
            raise RecipeError(
                f"eval: {other} and {contestant.name} are the same model ({contestant.folder}); compare different ones"
            )


def check_judge(name: str, spec, stage_dirs: dict[str, Path], prompts: list[PromptExample]) -> None:
    """Fail now rather than after sampling: columns a rule needs, and the folders of reward models and
    judges. (Names, keys and modes were checked when the recipe was read; the heavy models themselves
    load when their turn comes.)"""
    from reward_models import build_reward

    try:
        for part in reward_parts(spec):
            if part.type == "rule":
                columns = sorted({k for p in prompts for k in p.columns})
                build_reward(part)(
                    [p.messages for p in prompts],
                    [""] * len(prompts),
                    **{k: [p.columns.get(k) for p in prompts] for k in columns},
                )
            elif part.type == "learned":
                folder = stage_dirs[part.from_stage] if part.from_stage else Path(part.path)
                if check_folder(folder).get("kind") != "rm":
                    raise RecipeError(f"judge '{name}': {folder} is not a reward-model stage")
            elif part.type in ("remote", "openai"):
                build_reward(part)  # no request yet: its API key's variable must be set
            elif Path(part.model).is_dir():
                check_folder(Path(part.model))
            else:
                resolve_model(part.model)
    except KeyError as err:
        raise RecipeError(f"judge '{name}': {err.args[0]}") from None


def generate(
    contestant: Contestant, cfg: EvalConfig, prompts: list[PromptExample], settings: Sampling, precision: str
) -> tuple[list[Rollout], str, dict | None]:
    """(contestant.best_of rollouts per prompt, the engine that sampled them, how far the engine's logprobs of its own
    answers are from the model's as the trainer computes it); the model is freed before returning.

    An engine that is not the trainer's own forward (vLLM) may answer like a different model; the
    report states the mismatch per model so a win-rate between engines that disagree is not read
    as a difference between the models. None for the hf engine (the model's own forward)."""
    from align.models.trained import load_trained

    if contestant.is_base:  # quantized as the recipe's stages load their base: the policy's starting point
        model = load_base_model(cfg.model, cfg.quantization, precision, contestant.folder)
        tokenizer = load_tokenizer(cfg.model, contestant.folder)
    else:
        model, tokenizer = load_trained(
            contestant.folder, precision=precision, trust_remote_code=cfg.model.trust_remote_code
        )
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":  # 4-bit bases are placed at load
        model.to("cuda")
    settings = replace(settings, n=contestant.best_of)
    engine = rollout_engine(cfg, model, tokenizer, precision, prompts, len(prompts) * settings.n, alone=True)
    used = engine.describe()
    console.print(f"{contestant.name}: {len(prompts) * settings.n} answers from {used}")
    try:
        rollouts = engine.generate([p.messages for p in prompts], settings)
    finally:
        engine.close()
    mismatch = None
    if not getattr(engine, "samples_from_trainer", False):
        checked = fidelity_sample(rollouts)
        trainer = score_rollouts(model, checked, tokenizer.pad_token_id, settings.temperature or 1.0, precision)
        mismatch = {**logprob_mismatch([r.logprobs for r in checked], trainer), "answers": len(checked)}
        console.print(
            f"{contestant.name}: engine vs trainer logprobs of {len(checked)} of its answers: mean "
            f"{mismatch['logprob_mismatch_mean']:.4f}, "
            f"max {mismatch['logprob_mismatch_max']:.3f} per token"
        )
    del engine, model
    free_memory()
    return rollouts, used, mismatch


FIDELITY_ANSWERS = 32


def fidelity_sample(rollouts: list[Rollout], most: int = FIDELITY_ANSWERS) -> list[Rollout]:
    """The answers the trainer rescores to check the engine: the first drawn for each prompt, at most
    ``most`` of them spread evenly over the prompts (so every named set is in it). ~1,000 tokens
    measure a mean per-token mismatch well; rescoring every answer cost as much as drawing them.

    >>> from align.rollout.engine import Rollout
    >>> drawn = [Rollout(i // 2, [], [1], [0.0], "stop", "") for i in range(20)]  # 10 prompts x 2 answers
    >>> [(r.prompt_index, drawn.index(r)) for r in fidelity_sample(drawn, most=4)]
    [(0, 0), (2, 4), (5, 10), (7, 14)]
    >>> len(fidelity_sample(drawn)) == 10
    True
    """
    first = list({r.prompt_index: r for r in reversed(rollouts)}.values())[::-1]
    if len(first) <= most:
        return first
    return [first[i * len(first) // most] for i in range(most)]


def spec_text(spec) -> str:
    """{type: rule, name: gsm8k_exact} -> 'rule gsm8k_exact'; weighted sums joined by ' + '."""
    if isinstance(spec, list):
        return " + ".join(spec_text(part) for part in spec)
    written = spec.model_dump(by_alias=True, exclude_defaults=True)
    return " ".join(f"{v}" if k in ("type", "name", "model") else f"{k}={v}" for k, v in written.items())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _written(spec):
    """A judge's spec as the recipe would write it (report.json)."""
    if isinstance(spec, list):
        return [_written(part) for part in spec]
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
