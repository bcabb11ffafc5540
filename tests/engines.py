"""Engines for tests, plugged in through the `engine` config key like any other backend.

They wrap the real llama.cpp engine and only add delays, so a test can catch a worker mid-stream
(kill it, cancel it) without racing a model that generates thousands of tokens a second.
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

from worker.engine import LlamaEngine
from worker.generation import Sampling


class SlowEngine(LlamaEngine):
    """Seconds before the first token and between tokens come from the worker's environment."""

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        first = float(os.environ.get("TEST_FIRST_TOKEN_DELAY", "0"))
        each = float(os.environ.get("TEST_TOKEN_DELAY", "0.02"))
        tokens = super().generate(prompt, sampling)
        time.sleep(first)
        for token in tokens:
            yield token
            time.sleep(each)
