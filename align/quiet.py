"""Library messages that are expected on a healthy run, silenced where align knows why they appear.

Each one is replaced by a single line saying what align does instead; any message that does not
match exactly what is expected still shows, so a real problem is never hidden.

- transformers' LOAD REPORT "score.weight MISSING ... newly initialized" when a reward model's
  base loads: the scalar head is new for training, or comes from the saved adapter right after.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": that optional kernel
  is a download from the Hugging Face hub, which align never does at run time; bitsandbytes'
  built-in CPU kernel is used instead.
- vLLM's start-up warnings about settings align chose on purpose for an in-process CPU engine
  (eager mode, no chunked prefill, a fixed seed, no Triton, thread binding, no tcmalloc). They go
  through align/vllm_logging.json (vLLM's own VLLM_LOGGING_CONFIG_PATH), whose filter drops exactly
  these; every other vLLM warning still prints.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Callable, Iterator

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_said: set[str] = set()


class _Drop(logging.Filter):
    """Drops the records ``matches`` recognises and says ``instead`` once per process."""

    def __init__(self, matches: Callable[[str], bool], instead: str):
        super().__init__()
        self.matches, self.instead, self.dropped = matches, instead, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.matches(record.getMessage()):
            return True
        self.dropped += 1
        _say_once(self.instead)
        return False


def _say_once(text: str) -> None:
    """Print what align did instead of a silenced message, once per process."""
    if text and text not in _said:
        from align.console import console

        _said.add(text)
        console.print(f"[dim]{text}[/]")


def load_report_rows(message: str) -> list[tuple[str, str]]:
    """(key, status) rows of a transformers LOAD REPORT table; [] for any other message."""
    if "LOAD REPORT" not in message:
        return []
    rows = []
    for line in _ANSI.sub("", message).splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) >= 2 and cells[0] and cells[0] != "Key" and not set(cells[0]) <= set("-+"):
            rows.append((cells[0], cells[1]))
    return rows


@contextmanager
def expected_missing_weights(names: tuple[str, ...], instead: str) -> Iterator[None]:
    """Within the block, a LOAD REPORT whose every row is one of ``names`` MISSING is dropped; a
    report with anything else in it (an unexpected missing or unused weight) is shown as usual."""

    def only_expected(message: str) -> bool:
        rows = load_report_rows(message)
        return bool(rows) and all(key in names and status == "MISSING" for key, status in rows)

    drop = _Drop(only_expected, instead)
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def silence_bitsandbytes_kernel_download() -> None:
    """Install (once) the filter for bitsandbytes' optional-kernel warning; call before it imports."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _Drop) for f in logger.filters):
        logger.addFilter(
            _Drop(
                lambda m: m.startswith("Failed to load CPU gemm_4bit_forward from kernels-community"),
                "bitsandbytes: 4-bit matmuls use its built-in CPU kernel (the optional kernels-community "
                "kernel is a hub download; align stays offline)",
            )
        )


# vLLM warnings that describe choices align makes for its in-process CPU engine (align/rollout/vllm.py).
EXPECTED_VLLM = (
    "The global random seed is set to",  # seeded on purpose: reproducible rollouts
    "This model does not officially support disabling chunked prefill",  # off on CPU: seeded requests crash with it
    "Enforce eager set, disabling torch.compile",  # eager on CPU
    "Inductor compilation was disabled",
    "Triton is installed, but doesn't include CPU backend",
    "Triton is not installed. triton-cpu is expected",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type",
    "is not found in LD_PRELOAD",  # tcmalloc / iomp: a speed hint for dedicated servers
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    # a second engine in one process (align run: sample, then grpo, then eval) registers vLLM's kernels
    # again and sees the variable its first engine set
    "is already registered. Overwriting.",
    "Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
    # every weight sync: a merged sync pushes only the adapted blocks (and never the rotary layer's
    # cos/sin cache, a buffer), so vLLM warns about each layer that got nothing and puts its own weights
    # back, as designed; the sync probe checks the engine's logprobs after every sync anyway
    ": Failed to load weights",
    "Following weights were not loaded from checkpoint",
)


class ExpectedVLLMWarnings(logging.Filter):
    """Named in align/vllm_logging.json: drops EXPECTED_VLLM, says once what align set up instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(text in message for text in EXPECTED_VLLM):
            return True
        _say_once(
            "vllm: in-process CPU engine, eager, no chunked prefill, seeded requests "
            "(its warnings about these choices are hidden: align/quiet.py)"
        )
        return False


def vllm_logging_config() -> str:
    """The logging config file align hands vLLM (unless the user set VLLM_LOGGING_CONFIG_PATH)."""
    from pathlib import Path

    return str(Path(__file__).with_name("vllm_logging.json"))
