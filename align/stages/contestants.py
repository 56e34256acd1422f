"""Who an eval compares, and their answers: the policy and each baseline located (a stage of the
recipe, a folder, the base, or best-of-n answers of one of them) and checked without loading weights,
then sampled one model at a time, the engine checked against the trainer, a best-of-n baseline's
answers picked by its reward."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from align.artifacts import stage_folder
from align.config import BestOfBaseline, EvalConfig, RecipeError
from align.console import console
from align.data.prompt_data import PromptExample
from align.models.loading import load_base_model, load_tokenizer, read_stage_manifest
from align.rollout.engine import Rollout, Sampling
from align.rollout.scoring import logprob_mismatch, score_rollouts
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
    firsts: dict[int, Rollout] = {}
    for rollout in rollouts:
        firsts.setdefault(rollout.prompt_index, rollout)
    first = [firsts[i] for i in sorted(firsts)]
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
