"""The model under the wrappers training puts around it (kept free of heavy imports: batching uses it)."""

from __future__ import annotations


def inner_model(model):
    """The transformers model under DDP's wrapper (``.module``) and peft's (``get_base_model``)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
