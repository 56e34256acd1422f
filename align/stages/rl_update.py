"""The update half of an online-RL step, shared by grpo.py and ppo.py: the trainer's pass over the
rollouts (its logprobs, the reference's, the values), then epochs x minibatches x micro-batches.

A step's rollouts are rows of one rollout batch ([B, P + C] sequences, [B, C] completion tensors).
  recompute  - ``rollout_logprobs``: no-grad passes, micro-batch by micro-batch, results on the CPU
  update     - ``minibatch_updates``: each epoch shuffles the step's rows with a seeded generator, cuts
               them into minibatches (one optimizer step each) and each minibatch into micro-batches of
               similar length whose gradients accumulate; the stage's own ``micro_step`` computes the
               loss of a micro-batch and calls backward. Under DDP the rows are numbered as in one
               process and each process trains the rows it rolled out, against the whole minibatch's
               denominators, so N processes equal one (align/stages/ranks.py).
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import torch

from align.models.adapters import reference_mode
from align.models.loading import autocast
from align.rollout.scoring import policy_outputs
from align.stages.ranks import sum_gradients, summed, world


def micro_batches(indices: list[int], size: int, batch: dict[str, torch.Tensor] | None = None) -> Iterator[list[int]]:
    """``indices`` in chunks of ``size``. Given the rollout ``batch``, the rows are first sorted by their
    length (prompt + completion tokens; ties by index, so the chunks do not depend on the order the rows
    came in), so a micro-batch holds rows of similar length and ``select_rows`` drops the padding columns
    none of them uses (BENCHMARKS.md). A minibatch's gradient is the sum over its micro-batches: their order
    and grouping do not change it."""
    if batch is not None:
        lengths = batch["attention_mask"].sum(-1).tolist()
        indices = sorted(indices, key=lambda i: (lengths[i], i))
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")  # [B, P + C]; the rest of a rollout batch is [B, C]


def select_rows(batch: dict[str, torch.Tensor], rows: list[int], device) -> dict[str, torch.Tensor]:
    """The given rows of every tensor in a rollout batch, on the trainer's device, without the padding
    columns none of them uses: prompt columns left of their longest prompt (left padding) and completion
    columns right of their longest completion. The completion tensors come back as the first
    ``width`` = ``micro["completion_ids"].shape[1]`` columns of the batch's: read the other [B, C]
    tensors of those rows with ``columns``."""
    picked = {k: v[rows] for k, v in batch.items()}
    completion_mask = picked["completion_mask"]  # ones then zeros: each completion is a prefix
    prompt_width = picked["input_ids"].shape[1] - completion_mask.shape[1]
    width = max(int(completion_mask.sum(-1).max()), 1) if completion_mask.shape[1] else 0
    left = prompt_width - int(picked["attention_mask"][:, :prompt_width].sum(-1).max())
    return {
        k: (v[:, left : prompt_width + width] if k in SEQUENCE_KEYS else v[:, :width]).to(device)
        for k, v in picked.items()
    }


def columns(tensor: torch.Tensor, rows: list[int], width: int, device) -> torch.Tensor:
    """``tensor[rows]`` of a [B, C] tensor, cut to the ``width`` completion columns ``select_rows`` kept."""
    return tensor[rows, :width].to(device)


@torch.no_grad()
def rollout_logprobs(
    policy, reference, batch, cfg, precision, device, policy_pass: bool, reference_pass: bool, value_head=None
):
    """(the rollout policy's logprobs [B, C], their entropy [B, C], the reference's logprobs [B, C], the
    value head's values [B, C]) of the sampled tokens, each None when its pass is not asked for (values:
    with a ``value_head`` and the policy pass); micro-batch by micro-batch, on the CPU."""
    shape = batch["completion_ids"].shape
    values_pass = policy_pass and value_head is not None
    old, entropy, ref, values = (
        torch.zeros(shape) if wanted else None for wanted in (policy_pass, policy_pass, reference_pass, values_pass)
    )
    for rows in micro_batches(list(range(shape[0])), cfg.train.batch_size, batch):
        micro = select_rows(batch, rows, device)
        width = micro["completion_ids"].shape[1]
        with autocast(precision):
            if policy_pass:
                logps, ent, vals = policy_outputs(policy, micro, cfg.rollout.temperature, value_head, entropy=True)
                old[rows, :width], entropy[rows, :width] = logps.float().cpu(), ent.float().cpu()
                if values_pass:
                    values[rows, :width] = vals.float().cpu()
            if reference_pass:
                with reference_mode(policy, reference):
                    ref[rows, :width] = policy_outputs(policy, micro, cfg.rollout.temperature)[0].float().cpu()
        policy.train()
    return old, entropy, ref, values


MicroStep = Callable[[list[int], float, int], tuple[float, float]]


def minibatch_updates(
    mask: torch.Tensor,
    batch: dict[str, torch.Tensor],
    micro_step: MicroStep,
    *,
    epochs: int,
    minibatch: int,
    cfg,
    step: int,
    params: list[torch.nn.Parameter],
    optimizer,
    scheduler,
    log,
    early_stop_kl: float | None = None,
    ptx: Callable[[int], float] | None = None,
) -> None:
    """``epochs`` passes over this process's rollout rows (``mask`` [B, C]) in seeded random minibatches
    of ``minibatch`` rows of the whole step, one optimizer step each, its micro-batches of
    train.batch_size accumulating into it.

    ``micro_step(rows, tokens, rows_in_minibatch)`` runs one micro-batch: its loss over the minibatch's
    ``tokens`` (every process's) and backward; it returns (the loss, its approximate KL). With
    ``early_stop_kl``, an epoch whose mean approximate KL (over every process) passes it ends the update.
    ``ptx(update)`` adds the ptx term's gradients (align/stages/ptx.py) to the update-th optimizer step of
    the stage (numbered as if no epoch stopped early, so the rows it reads depend on the step alone).
    """
    rank, processes = world()
    own = len(mask)
    order, first = list(range(own * processes)), rank * own
    per_epoch = -(-len(order) // minibatch)
    for epoch in range(epochs):
        random.Random(cfg.seed * 31 + step * 1009 + epoch).shuffle(order)
        epoch_kl = []
        for index, whole in enumerate(micro_batches(order, minibatch)):
            mine = [i - first for i in whole if first <= i < first + own]
            tokens, minibatch_loss = summed(mask[mine].sum().item()), 0.0
            for rows in micro_batches(mine, cfg.train.batch_size, batch):
                loss, kl_now = micro_step(rows, tokens, len(whole))
                minibatch_loss += loss
                epoch_kl.append(kl_now)
            if ptx is not None:
                log.add(ptx_nll=ptx(((step - 1) * epochs + epoch) * per_epoch + index))
            sum_gradients(params)  # each process's share of the minibatch loss -> the whole one's
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            log.add(loss=summed(minibatch_loss), grad_norm=grad_norm.item())
        # the mean over every process's micro-batches, so all of them stop (or go on) together
        if early_stop_kl is not None and summed(sum(epoch_kl)) / summed(len(epoch_kl)) > early_stop_kl:
            log.add(early_stopped_epoch=epoch + 1)
            break
