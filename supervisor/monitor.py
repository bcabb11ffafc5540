"""Measures workers from outside: /proc for memory, NVML for GPU memory. It decides nothing."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

from .gpu import GpuSource
from .policies import Sample
from .procfs import MemorySample, read_memory

HISTORY = 120  # samples kept per worker: two minutes at the default interval


@dataclass
class WorkerHistory:
    """What the watchdog knows of one worker: periodic samples, samples after each request, the baseline."""

    periodic: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    per_request: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    baseline: Sample | None = None


class Monitor:
    def __init__(self, gpu: GpuSource, read: Callable[[int], MemorySample | None] = read_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gpu = gpu
        self._read = read
        self._clock = clock

    def sample(self, pid: int, requests: int, gpu_memory: dict[int, int] | None = None) -> Sample | None:
        """None when the process is gone. Pass `gpu_memory` to share one NVML query across workers."""
        memory = self._read(pid)
        if memory is None:
            return None
        if gpu_memory is None and self.gpu.available:
            gpu_memory = self.gpu.process_memory()
        gpu = gpu_memory.get(pid, 0) if self.gpu.available and gpu_memory is not None else None
        return Sample(at=self._clock(), private=memory.private, file_rss=memory.rss_file, gpu=gpu, requests=requests)
