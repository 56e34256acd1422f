"""Fault injection for the resume tests: ``ALIGN_FAULT=<stage kind>:<event>:<step>`` kills this
process with SIGKILL at that point, as a power cut or an OOM killer would.

Events: ``step`` (optimizer/RL step N has finished, its checkpoint not yet written) and ``save``
(checkpoint N is on disk but not yet marked complete: a torn save). A kill from outside the
process lands at a random point; this lands at the points that are hard to hit by chance.
"""

from __future__ import annotations

import os
import signal


def fault_point(stage: str, event: str, step: int) -> None:
    if os.environ.get("ALIGN_FAULT") == f"{stage}:{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
