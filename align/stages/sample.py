"""`align sample`: preference pairs from the policy's own answers.

  1. check   - prompts (row report), the reward spec and the policy to sample from, before any model loads
  2. sample  - rollout.samples_per_prompt answers per prompt from the policy (a stage's adapter, or the
               base model), chunk by chunk; each finished chunk is saved, so a killed run resumes
               after its last chunk and draws exactly the answers an uninterrupted run would
  3. rank    - the reward scores every answer (the policy is freed first); per prompt the best answer
               is chosen and the worst rejected. No pair when best and worst are within tie_margin
               (nothing to prefer) or when the best answer was cut at max_new_tokens (DPO would teach
               an ending the policy never wrote); both are counted
  4. write   - pairs.jsonl from the training prompts, eval_pairs.jsonl from the held-out ones,
               samples.jsonl with every answer and its score, the manifest last with the counts

dpo and rm stages read the pairs with `data: {from: <this stage>}`. sft -> sample -> dpo is DPO on
on-policy data; sample again from the dpo stage and train once more, and it is iterative (online) DPO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from align.artifacts import EVAL_PAIRS_FILE, PAIRS_FILE, write_atomic, write_manifest
from align.config import RecipeError, SampleConfig, reward_parts
from align.console import console, print_plan
from align.data.prompt_data import PromptExample, load_prompts
from align.models.loading import load_base_model, load_tokenizer, resolve_precision
from align.models.resolve import resolve_model
from align.stages.common import elsewhere, prepare_output, process_state, referenced_dirs, source_stage
from align.stages.rollouts import rollout_engine, sampling, score

CHUNK_PROMPTS = 32  # prompts per saved chunk: what a killed run can lose


def plan(cfg: SampleConfig, tokenizer) -> tuple[str, str]:
    """(prompts, work) for `align run`'s plan; reading every prompt is the validation."""
    train, held_out, _ = load_prompts(cfg.data, tokenizer, cfg.seed)
    return (
        f"{len(train)} prompts + {len(held_out)} held out",
        f"{(len(train) + len(held_out)) * cfg.rollout.samples_per_prompt} answers",
    )


def run_sample(
    cfg: SampleConfig,
    output_dir: str | Path,
    recipe_name: str = "recipe",
    from_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    provenance: dict | None = None,
) -> Path:
    from reward_models import build_reward

    started = time.time()
    output_dir = Path(output_dir)
    if elsewhere(process_state()):  # one process runs this stage
        return output_dir

    # 1. Prompts, the reward (rules are tried on the prompts now) and the policy: checked before any model loads.
    model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(cfg.model, model_path)
    train, held_out, reports = load_prompts(cfg.data, tokenizer, cfg.seed)
    reward = build_reward(cfg.reward, referenced_dirs(cfg, recipe_name), cfg.model.trust_remote_code)
    for part in reward_parts(cfg.reward):
        if part.type == "rule":  # a column the rule needs and the prompts lack fails now, not after sampling
            try:
                score(build_reward(part), train + held_out, [])
            except KeyError as err:
                raise RecipeError(
                    f"sample: reward rule {part.name!r}: {err.args[0]} (data files: {', '.join(cfg.data.train)})"
                ) from None
    source = source_stage(cfg, recipe_name, from_dir)
    prepare_output(process_state(), output_dir, cfg, overwrite, resume, together=False)
    r = cfg.rollout
    print_plan(
        f"align sample - {recipe_name}",
        {
            "policy": f"{source} (adapter)" if source else f"the base model {cfg.model.name}",
            "reward": getattr(reward, "name", str(cfg.reward)),
            **{f"data {report.name}": report.summary() for report in reports},
            "sampling": f"{r.samples_per_prompt} answers per prompt, engine {r.engine}, temperature {r.temperature}, "
            f"top_p {r.top_p}, "
            f"top_k {r.top_k}, <= {r.max_new_tokens} new tokens, seed {cfg.seed}",
            "pairs": (
                "best vs worst answer per prompt"
                if cfg.pairs == "best_vs_worst"
                else "every answer vs every answer it outscored"
            )
            + f"; none when the scores differ by <= {cfg.tie_margin} or the better answer was cut off",
            "output": str(output_dir),
        },
    )

    # 2. Sample, chunk by chunk; finished chunks are on disk, so a resumed run starts after them.
    prompts = train + held_out
    chunks = _sample(cfg, source, model_path, prompts, output_dir / "checkpoints", resume)

    # 3. Rank: every answer scored by the reward; pairs per prompt as cfg.pairs says.
    answers = [a for chunk in chunks for a in chunk]
    for answer, value in zip(answers, score(reward, prompts, _as_rollouts(answers)).tolist()):
        answer["score"] = value
    pairs, counts = {}, {}
    for split, examples, offset in (("train", train, 0), ("held_out", held_out, len(train))):
        by_prompt = [[a for a in answers if a["prompt_index"] == offset + i] for i in range(len(examples))]
        pairs[split], counts[split] = make_pairs(examples, by_prompt, cfg.tie_margin, every_pair=cfg.pairs == "all")

    # 4. Files, then the manifest: written last, it says the pairs are complete.
    write_atomic(output_dir / PAIRS_FILE, "".join(json.dumps(p) + "\n" for p in pairs["train"]))
    if held_out:
        write_atomic(output_dir / EVAL_PAIRS_FILE, "".join(json.dumps(p) + "\n" for p in pairs["held_out"]))
    write_atomic(
        output_dir / "samples.jsonl",
        "".join(
            json.dumps(
                {
                    "prompt": prompts[a["prompt_index"]].messages,
                    "split": "train" if a["prompt_index"] < len(train) else "held_out",
                    **a,
                }
            )
            + "\n"
            for a in answers
        ),
    )
    stats = sample_stats(answers)
    write_manifest(
        output_dir,
        status="complete",
        artifact=PAIRS_FILE,
        stage="sample",
        kind="sample",
        recipe=recipe_name,
        base_model=cfg.model.name,
        from_stage=str(source) if source else None,
        reward=getattr(reward, "name", str(cfg.reward)),
        pairs=counts,
        answers=stats,
        data={report.name: report.as_dict() for report in reports},
        seconds=round(time.time() - started, 1),
        **(provenance or {}),
    )
    for split, c in counts.items():
        if c["prompts"]:
            console.print(
                f"{split}: {c['pairs']} pairs from {c['prompts']} prompts ({c['ties']} all tied, {c['best_cut_off']} "
                "best answer cut off); "
                f"chosen score {c['chosen_score_mean']:.3f} vs rejected {c['rejected_score_mean']:.3f}"
            )
    console.print(
        f"answers: mean score {stats['score_mean']:.3f}, {stats['truncated_fraction']:.0%} cut off at max_new_tokens"
    )
    if not pairs["train"]:
        raise RuntimeError(
            f"{output_dir}: no pairs - every prompt's answers scored alike (within {cfg.tie_margin}); "
            "sample more answers per prompt, at a higher temperature, or rank with a finer reward"
        )
    console.print(f"[bold green]done[/] in {time.time() - started:.0f}s: {output_dir / PAIRS_FILE}")
    return output_dir


def make_pairs(
    examples: list[PromptExample], answers: list[list[dict]], tie_margin: float, every_pair: bool = False
) -> tuple[list[dict], dict]:
    """Pairs of each prompt's answers as {prompt, chosen, rejected, chosen_score, rejected_score} rows: the
    best vs the worst, or with every_pair each answer vs each answer it outscored by more than tie_margin
    (a chosen answer that ran out of tokens is never paired; equal text pairs are written once). The
    counts: prompts, pairs, ties (best - worst <= tie_margin), best_cut_off (the best answer ran out of
    tokens), and the mean chosen and rejected scores.

    >>> from align.data.prompt_data import PromptExample
    >>> ask = [PromptExample([{"role": "user", "content": "2+2?"}], [1])]
    >>> scored = [("5", 0.0), ("4", 1.0), ("3", 0.0), ("4", 1.0)]
    >>> said = [[{"text": t, "score": s, "truncated": False} for t, s in scored]]
    >>> rows, counts = make_pairs(ask, said, 0.0)
    >>> rows[0]["chosen"], rows[0]["rejected"], counts["pairs"], counts["ties"]
    ('4', '5', 1, 0)
    >>> [(r["chosen"], r["rejected"]) for r in make_pairs(ask, said, 0.0, every_pair=True)[0]]
    [('4', '5'), ('4', '3')]
    """
    rows, ties, cut = [], 0, 0
    for example, mine in zip(examples, answers):
        best = max(mine, key=lambda a: a["score"])  # the first of equals: answers are i.i.d. samples
        worst = min(mine, key=lambda a: a["score"])
        if best["score"] - worst["score"] <= tie_margin:
            ties += 1
            continue
        cut += best["truncated"]  # a cut-off answer is never chosen (below), so best-vs-worst gives no pair
        if every_pair:
            ranked = sorted(mine, key=lambda a: -a["score"])  # stable: equal scores keep their sampling order
            duos = [
                (a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :] if a["score"] - b["score"] > tie_margin
            ]
        else:
            duos = [(best, worst)]
        seen = set()
        for chosen, rejected in duos:
            if chosen["truncated"] or (chosen["text"], rejected["text"]) in seen:
                continue
            seen.add((chosen["text"], rejected["text"]))
            rows.append(
                {
                    "prompt": example.messages,
                    "chosen": chosen["text"],
                    "rejected": rejected["text"],
                    "chosen_score": chosen["score"],
                    "rejected_score": rejected["score"],
                }
            )
    mean = lambda key: sum(r[key] for r in rows) / len(rows) if rows else 0.0  # noqa: E731
    return rows, {
        "prompts": len(examples),
        "pairs": len(rows),
        "ties": ties,
        "best_cut_off": cut,
        "chosen_score_mean": mean("chosen_score"),
        "rejected_score_mean": mean("rejected_score"),
    }


def sample_stats(answers: list[dict]) -> dict[str, float]:
    n = max(len(answers), 1)
    return {
        "answers": len(answers),
        "score_mean": sum(a["score"] for a in answers) / n,
        "truncated_fraction": sum(a["truncated"] for a in answers) / n,
        "length_mean": sum(a["length"] for a in answers) / n,
    }


def _sample(
    cfg: SampleConfig,
    source: Path | None,
    model_path: Path,
    prompts: list[PromptExample],
    checkpoints: Path,
    resume: bool,
) -> list[list[dict]]:
    """Every chunk's answers: chunks already on disk (resuming) are read, the others sampled and saved.
    Each chunk has its own seed, so the answers do not depend on where a run was killed."""
    import torch

    from align.models.trained import load_trained

    count = (len(prompts) + CHUNK_PROMPTS - 1) // CHUNK_PROMPTS
    path = lambda i: checkpoints / f"chunk-{i:05d}.jsonl"  # noqa: E731
    chunks: list[list[dict] | None] = [None] * count
    if resume:
        for i in range(count):
            if path(i).is_file():
                chunks[i] = [json.loads(line) for line in path(i).read_text(encoding="utf-8").splitlines()]
    todo = [i for i in range(count) if chunks[i] is None]
    if not todo:
        console.print(f"all {count} chunks were sampled before; resuming at the ranking")
        return chunks
    precision = resolve_precision(cfg.model.precision)
    if source is None:
        model, tokenizer = (
            load_base_model(cfg.model, cfg.quantization, precision, model_path),
            load_tokenizer(cfg.model, model_path),
        )
    else:
        model, tokenizer = load_trained(source, precision=precision, trust_remote_code=cfg.model.trust_remote_code)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    model.eval()
    sequences = CHUNK_PROMPTS * cfg.rollout.samples_per_prompt
    engine = rollout_engine(cfg, model, tokenizer, precision, prompts, sequences, alone=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"sampling {len(todo)} of {count} chunks from {engine.describe()}")
        for i in todo:
            part = prompts[i * CHUNK_PROMPTS : (i + 1) * CHUNK_PROMPTS]
            rollouts = engine.generate([p.messages for p in part], sampling(cfg, step=i))  # a seed per chunk
            chunks[i] = [
                {
                    "prompt_index": i * CHUNK_PROMPTS + ro.prompt_index,
                    "text": ro.text,
                    "truncated": ro.truncated,
                    "length": len(ro.completion_ids),
                }
                for ro in rollouts
            ]
            write_atomic(path(i), "".join(json.dumps(a) + "\n" for a in chunks[i]))
            console.print(f"chunk {i + 1}/{count}: {len(rollouts)} answers")
    finally:
        engine.close()
    del engine, model
    return chunks


def _as_rollouts(answers: list[dict]):
    """What ``score`` reads of a rollout (its prompt and its text), for answers read back from disk."""
    from align.rollout.engine import Rollout

    return [Rollout(a["prompt_index"], [], [], [], "length" if a["truncated"] else "stop", a["text"]) for a in answers]
