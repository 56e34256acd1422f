"""Switching a model between training and evaluation mode in one pass over its modules.

``Module.train(mode)`` recurses through every child, setting ``training`` through ``Module.__setattr__``: 7-10 ms
each way for SmolLM2 with a LoRA on every linear layer (2,499 modules), paid around every no-grad pass an RL
step makes (the weight sync's probe, reference log-probs, rollouts from the trainer's own forward). One
``modules()`` walk setting the same flags directly: 3 ms (BENCHMARKS.md).
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch


def _sets_only_the_flag(module: torch.nn.Module) -> bool:
    """Whether ``module.train(mode)`` would do nothing but set its own flag and its children's."""
    if isinstance(inspect.getattr_static(type(module), "training", None), property):  # a setter does more
        return False
    train = type(module).train
    if train in (torch.nn.Module.train, torch.nn.parallel.DistributedDataParallel.train):  # DDP's returns self
        return True
    # transformers' PreTrainedModel.train only re-applies hub kernels (`use_kernels`), which align never loads
    modeling = sys.modules.get("transformers.modeling_utils")  # not imported: no module can be one
    return modeling is not None and train is modeling.PreTrainedModel.train and not module.use_kernels


def set_training(model: torch.nn.Module, mode: bool) -> None:
    """``model.train(mode)``, faster: every module's ``training`` flag set in one walk. A model holding a
    module whose ``train`` does more than that takes ``model.train(mode)`` itself."""
    modules = list(model.modules())
    if not all(_sets_only_the_flag(module) for module in modules):
        model.train(mode)
        return
    for module in modules:
        module.__dict__["training"] = mode  # where Module.__init__ keeps it; __setattr__ would do the same


@contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode (no dropout) inside the block, in its previous mode after."""
    was_training = model.training
    set_training(model, False)
    try:
        yield model
    finally:
        set_training(model, was_training)
