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

import json
import time
from pathlib import Path

from align.artifacts import write_atomic, write_manifest
from align.config import BestOfBaseline, DataConfig, EvalConfig, RecipeError, reward_parts
from align.console import console, print_plan
from align.data.loading import DataError
from align.data.prompt_data import PromptExample, concatenate, encode_prompt_files
from align.data.report import RowReport
from align.eval.report import print_table, write_report
from align.eval.winrate import outcomes_from_probabilities, outcomes_from_scores, summarize
from align.model_card import record_evaluation
from align.models.loading import load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.stages.common import elsewhere, prepare_output, process_state, referenced_dirs
from align.stages.contestants import (
    best_answers,
    check_distinct,
    check_folder,
    contestant,
    free_memory,
    generate,
    locate,
    spec_text,
)
from align.stages.rollouts import rollout_sampling, score


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
    settings = rollout_sampling(r, cfg.seed)
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
    record_evaluation(policy.folder, output_dir, report)  # its win-rates into the judged stage's model card
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
            elif part.type == "python":
                build_reward(part)  # imports the user's file now: a missing file or function fails before sampling
            elif Path(part.model).is_dir():
                check_folder(Path(part.model))
            else:
                resolve_model(part.model)
    except KeyError as err:
        raise RecipeError(f"judge '{name}': {err.args[0]}") from None


def _written(spec):
    """A judge's spec as the recipe would write it (report.json)."""
    if isinstance(spec, list):
        return [_written(part) for part in spec]
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
