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
    """Seconds to load, before the first token and between tokens come from the worker's environment."""

    def load(self, path: str, options: dict):
        time.sleep(float(os.environ.get("TEST_LOAD_DELAY", "0")))
        return super().load(path, options)

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        first = float(os.environ.get("TEST_FIRST_TOKEN_DELAY", "0"))
        each = float(os.environ.get("TEST_TOKEN_DELAY", "0.02"))
        tokens = super().generate(prompt, sampling)
        time.sleep(first)
        for token in tokens:
            yield token
            time.sleep(each)


MiB = 1 << 20


class LeakyEngine(SlowEngine):
    """Leaks TEST_LEAK_MIB after each request, or TEST_LEAK_MIB_PER_TOKEN during generation: memory
    that stays referenced and written, so it is resident private memory, as a real leak is."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: list[bytes] = []

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        per_token = int(float(os.environ.get("TEST_LEAK_MIB_PER_TOKEN", "0")) * MiB)
        for token in super().generate(prompt, sampling):
            if per_token:
                self._kept.append(b"\x01" * per_token)
            yield token

    def after_request(self) -> None:
        per_request = int(float(os.environ.get("TEST_LEAK_MIB", "0")) * MiB)
        if per_request:
            self._kept.append(b"\x01" * per_request)
        super().after_request()


class ProbingEngine(LlamaEngine):
    """Tries, at each request, to connect where TEST_CONNECT_TO says (a unix socket path, or host:port)
    and says on stderr how that went: what a compromised worker could reach."""

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        import socket
        import sys

        target = os.environ["TEST_CONNECT_TO"]
        family = socket.AF_UNIX if target.startswith("/") else socket.AF_INET
        address = target if family == socket.AF_UNIX else (target.rsplit(":", 1)[0], int(target.rsplit(":", 1)[1]))
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                print("probe: connected", file=sys.stderr, flush=True)
            except OSError as e:
                print(f"probe: refused: {os.strerror(e.errno)}", file=sys.stderr, flush=True)
        return super().generate(prompt, sampling)
