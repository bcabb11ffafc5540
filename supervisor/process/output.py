"""A model's recent worker output (llama.cpp's own log, the worker's messages), for `llmctl tail`.

Kept per model rather than per worker: after a crash, the lines before it are what the operator wants.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

from supervisor.observe.fanout import Fanout

KEPT_LINES = 500


@dataclass(frozen=True)
class OutputLine:
    time: float  # unix seconds
    worker_pid: int
    line: str


class OutputLog:
    def __init__(self, size: int = KEPT_LINES, clock: Callable[[], float] = time.time) -> None:
        self._lines: collections.deque[OutputLine] = collections.deque(maxlen=size)
        self.followers: Fanout[OutputLine] = Fanout()
        self._clock = clock

    def append(self, worker_pid: int, line: str) -> None:
        entry = OutputLine(self._clock(), worker_pid, line)
        self._lines.append(entry)
        self.followers.publish(entry)

    def recent(self, count: int = 0) -> list[OutputLine]:
        """The last `count` lines kept (0: all of them)."""
        lines = list(self._lines)
        return lines[-count:] if count else lines
