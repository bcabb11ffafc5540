"""Engines whose worker dies the way a broken build or a damaged model file kills it."""

from __future__ import annotations

import os
import signal
from worker.engine import LlamaEngine
from worker.generation import Sampling


class SignalEngine(LlamaEngine):
    """Loads for real, then dies of the signal TEST_DIE_OF names (SIGILL, SIGBUS) at each request,
    as a kernel this CPU cannot run, or weights read from a truncated mmap'd file, would make it."""

    def sampler(self, sampling: Sampling):
        os.kill(os.getpid(), getattr(signal, os.environ["TEST_DIE_OF"]))  # default action: the process dies
        return super().sampler(sampling)
