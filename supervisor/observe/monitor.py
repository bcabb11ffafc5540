"""Measures workers from outside: /proc for memory, psutil for CPU time and CPU temperature, NVML for GPU
memory and temperature. It decides nothing."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import structlog

from supervisor.observe.gpu import GpuSnapshot, GpuSource, snapshot, unseen_workers
from supervisor.decide.policies import Sample
from supervisor.observe.procfs import MemorySample, read_memory

HISTORY = 120  # samples kept per worker: two minutes at the default interval
# psutil's names for sensors that read the CPU package or cores (Intel, AMD, ARM boards).
CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")

log = structlog.get_logger("llm_supervisor.monitor")


@dataclass
class WorkerHistory:
    """What the watchdog knows of one worker: periodic samples, samples after each request, the baseline."""

    periodic: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    per_request: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    baseline: Sample | None = None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process; None when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


def read_cpu_temperature(sensors: Callable[[], dict] = getattr(psutil, "sensors_temperatures", dict)) -> float | None:
    """The hottest CPU sensor in °C, or None where the host exposes none (VMs, containers): absent, not 0."""
    try:
        readings = sensors()
    except OSError:
        return None
    values = [t.current for name in CPU_SENSORS for t in readings.get(name, []) if t.current is not None]
    return max(values) if values else None


class Monitor:
    def __init__(self, gpu: GpuSource, read: Callable[[int], MemorySample | None] = read_memory,
                 clock: Callable[[], float] = time.monotonic, cpu: Callable[[int], float | None] = cpu_seconds,
                 cpu_temperature: Callable[[], float | None] = read_cpu_temperature) -> None:
        self.gpu = gpu
        self._read = read
        self._clock = clock
        self._cpu = cpu
        self._cpu_temperature = cpu_temperature
        # The host's last readings, taken once a tick, for status.
        self.last_gpus: GpuSnapshot | None = None
        self.last_cpu_temperature: float | None = None
        # Why no worker's GPU memory can be seen ("" while nothing says so), for status; logged once.
        self.gpu_note = ""
        self._noted = False
        self._sampled: set[int] = set()  # the workers sampled since the last tick

    def host(self) -> GpuSnapshot | None:
        """Once a tick: one NVML read shared by every worker, and the CPU temperature."""
        self.last_gpus = snapshot(self.gpu)
        self.last_cpu_temperature = self._cpu_temperature()
        workers, self._sampled = self._sampled, set()  # swapped, not cleared: sample() runs on another thread
        if self.last_gpus is not None:
            self.gpu_note = unseen_workers(self.last_gpus, workers, self.gpu.pids)
            if self.gpu_note and not self._noted:
                self._noted = True
                log.warning("gpu_processes_unmapped", reason=self.gpu_note)
        return self.last_gpus

    def sample(self, pid: int, requests: int, gpus: GpuSnapshot | None = None, context: int = 0) -> Sample | None:
        """None when the process is gone. GPU figures come from `gpus` or else the last tick's read:
        NVML is never called from here, so a hung driver cannot stall a request's path."""
        memory = self._read(pid)
        if memory is None:
            return None
        self._sampled.add(pid)
        gpus = gpus if gpus is not None else self.last_gpus
        return Sample(at=self._clock(), private=memory.private, file_rss=memory.rss_file, data=memory.data,
                      gpu=gpus.memory_of(pid) if gpus is not None else None, requests=requests, context=context,
                      cpu_s=self._cpu(pid))
