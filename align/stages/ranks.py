"""The online-RL loops (grpo.py, ppo.py) across processes: each rank's share of a step, and what the
ranks sum, gather and average. torch.distributed underneath (gloo on CPU, nccl on GPU), set up by
accelerate's PartialState under torchrun / accelerate launch; in one process every function here
is the identity, so the loops read the same either way.

How a step is split (``torchrun --nproc_per_node N``): the step's prompts are the same list on every
rank (same seed); rank r answers the r-th contiguous share of them with its own engine, so a prompt's
whole group of samples lives on one rank and group advantages need no communication. Loss
denominators (tokens, rows) are the whole step's, summed over ranks, and gradients are summed, so the
update is the single-process update of the same rollouts. Logged numbers are the ranks' mean, or are
computed on the gathered rollouts; rank 0 writes files.
"""

from __future__ import annotations

import dataclasses

import torch


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def share(items: list) -> list:
    """This rank's contiguous share of ``items`` (the whole list in one process); the plan checks that
    a step's prompts divide evenly, so every rank has the same number of rows."""
    rank, size = world()
    per_rank = len(items) // size
    return items[rank * per_rank : (rank + 1) * per_rank] if size > 1 else items


def spread(items: list) -> list:
    """Every size-th item from this rank's index: an uneven list (held-out prompts) spread over the ranks."""
    rank, size = world()
    return items[rank::size]


def summed(value: float) -> float:
    """The sum over ranks."""
    rank, size = world()
    if size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks (every rank logs the same keys each step)."""
    rank, size = world()
    if size == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: v / size for k, v in zip(keys, tensor.tolist())}


def gathered(items: list) -> list:
    """Every rank's list, concatenated in rank order (small Python objects: rollouts, rewards)."""
    rank, size = world()
    if size == 1:
        return items
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def unspread(mine: list, total: int) -> list:
    """Every rank's ``spread`` share gathered back into the original order of the ``total`` items."""
    rank, size = world()
    if size == 1:
        return mine
    parts = gathered([mine])
    out: list = [None] * total
    for r, part in enumerate(parts):
        out[r::size] = part
    return out


def gathered_rollouts(rollouts: list, prompts_per_rank: int) -> list:
    """The step's rollouts from every rank, each ``prompt_index`` renumbered into the whole step's prompts."""
    rank, _ = world()
    mine = [dataclasses.replace(r, prompt_index=r.prompt_index + rank * prompts_per_rank) for r in rollouts]
    return gathered(mine)


def sum_gradients(parameters: list[torch.Tensor]) -> None:
    """Sum the trainable gradients over the ranks (each rank's loss is its share of the whole step's loss,
    so the sum is the gradient of that loss). One flat all-reduce: adapters are small."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def whole_step(rows: torch.Tensor) -> torch.Tensor:
    """The step's [B, T] tensor from every rank's [b, T_rank] rows, zero-padded to the widest, in rank order
    (the rows as one process would hold them, so whole-batch statistics are computed exactly as there)."""
    rank, size = world()
    if size == 1:
        return rows
    import torch.distributed as dist

    width = torch.tensor([rows.shape[1]])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.nn.functional.pad(rows, (0, int(width) - rows.shape[1]))
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)


def my_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a ``whole_step`` tensor, cut back to the shape of ``like`` (its own rows)."""
    rank, size = world()
    if size == 1:
        return whole
    b, width = like.shape
    return whole[rank * b : (rank + 1) * b, :width]


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
