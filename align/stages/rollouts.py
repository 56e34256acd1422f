"""A stage's rollouts, for every stage that samples (grpo, ppo, sample, eval, the checkup and the
RL monitors): the engine its config asks for, a step's sampling settings, and the reward of answers."""

from __future__ import annotations

import torch

from align.data.prompt_data import PromptExample
from align.rollout.engine import Rollout, Sampling
from align.rollout.engines import make_engine


def rollout_engine(
    cfg, policy, tokenizer, precision: str, prompts: list[PromptExample], sequences: int, alone: bool = False
):
    """The stage's rollout engine. ``prompts`` and ``sequences`` (the most completions one generate call
    asks for) size a vLLM engine's KV cache on CPU when ``rollout.kv_cache_gib`` is auto. ``alone``: only
    this process of a multi-process launch starts an engine now (eval, sample)."""
    longest = max((len(p.prompt_ids) for p in prompts), default=0)
    kv = cfg.rollout.kv_cache_gib
    options = dict(
        kv_cache_gib=None if kv == "auto" else kv,
        kv_cache_workload=(sequences, longest + cfg.rollout.max_new_tokens),
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        seed=cfg.seed,
        sync=cfg.rollout.vllm_sync,
        engine_precision=cfg.rollout.engine_precision,
        alone=alone,
    )
    r = cfg.rollout
    server = dict(
        url=r.server_url,
        model=r.server_model,
        timeout=r.server_timeout,
        adapter_dir=r.server_adapter_dir,
        engine_precision=r.engine_precision,
        longest_sequence=longest + r.max_new_tokens,
    )
    return make_engine(r.engine, policy, tokenizer, precision, batch_size=r.batch_size, server=server, **options)


def rollout_sampling(r, seed: int) -> Sampling:
    """The Sampling a rollout section describes (n: its samples_per_prompt), drawn with ``seed``: the one
    place a stage's rollout settings become an engine's, so no stage can drop one of them."""
    return Sampling(
        n=r.samples_per_prompt,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=tuple(r.stop),
        seed=seed,
    )


def sampling(cfg, step: int, rank: int = 0) -> Sampling:
    """A step's (or a sample stage's chunk's) sampling settings; each process draws with its own seed
    (rank 0's is the one-process seed)."""
    return rollout_sampling(cfg.rollout, cfg.seed * 100_003 + step + 1_000_003 * rank)


def score(reward, examples: list[PromptExample], rollouts: list[Rollout]) -> torch.Tensor:
    """The reward of every rollout, [B]; columns (e.g. reference) repeated for each sample."""
    prompts = [examples[r.prompt_index].messages for r in rollouts]
    names = sorted({k for e in examples for k in e.columns})
    columns = {name: [examples[r.prompt_index].columns.get(name) for r in rollouts] for name in names}
    values = reward(prompts, [r.text for r in rollouts], **columns)
    return torch.tensor(values, dtype=torch.float32)
