"""GPU readings through NVML — the one seam tests feed, since CI has no GPU.

No GPU, no driver or no NVML library is a normal state: `Nvml.open()` returns an object whose readings
are empty, never an error.

The driver knows no PID namespaces: NVML names every process by its PID in the host's (initial)
namespace. In a container with its own (Kubernetes' default) those are not the PIDs the daemon gave its
workers, so `PidMap` translates them, in `snapshot()`, through the host's /proc when it is visible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PROC = Path("/proc")
# Where the Kubernetes manifest mounts the node's /proc, read-only (node-exporter's convention).
HOST_PROC = Path("/host/proc")
# PROC_PID_INIT_INO: the inode the kernel gives the initial PID namespace, on every machine.
INIT_PID_NAMESPACE = 0xEFFFFFFC


@dataclass(frozen=True)
class GpuReading:
    index: int
    temperature_c: int
    throttle_reasons: int  # NVML's clocks-event bitmask; 0 = running free
    memory_used: int
    memory_total: int


def ns_pids(proc: Path, pid: int | str) -> list[int]:
    """NSpid of PROC/PID/status: the process's PID in each namespace, from the one `proc` was mounted in
    down to its own. [] when it is gone (or the kernel predates 4.1)."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("NSpid:")), "")
    return [int(p) for p in line.split()[1:]]


def start_time(proc: Path, pid: int) -> int | None:
    """Clock ticks after boot when the process started (field 22 of PROC/PID/stat): with its PID it names
    one process in any /proc, where a PID alone may name another in a sibling namespace."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the name before ")" may hold spaces
    return int(fields[19]) if len(fields) > 19 else None


def pid_namespace(proc: Path) -> int | None:
    try:
        return os.stat(proc / "self" / "ns" / "pid").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class PidMap:
    """How NVML's PIDs become this daemon's. Without `host_proc` they are taken as they are: right on the
    host and in a pod with hostPID. With it (the host's /proc mounted into the container), a host PID
    becomes the innermost entry of its NSpid there, if that PID in our own /proc is the same process (the
    same start time); another container's processes, with PIDs of their own namespaces, are left out."""

    host_proc: Path | None = None
    own_proc: Path = PROC
    nested: bool = False  # this daemon runs in a PID namespace of its own

    @property
    def blind(self) -> bool:
        """NVML's PIDs are the host's and there is no way to tell which of them are our workers."""
        return self.nested and self.host_proc is None

    @classmethod
    def detect(cls, own_proc: Path = PROC, host_proc: Path = HOST_PROC) -> "PidMap":
        namespace = pid_namespace(own_proc)
        nested = namespace is not None and namespace != INIT_PID_NAMESPACE
        # The host's /proc lists us too ("self" there is our host PID), under a PID in each namespace
        # down to ours: more than one entry says it belongs to an outer namespace.
        if nested and len(ns_pids(host_proc, "self")) > 1:
            return cls(host_proc, own_proc, nested=True)
        return cls(None, own_proc, nested=nested)

    def own_pid(self, pid: int) -> int | None:
        """Our PID for the process NVML names `pid`; None when it is not in our namespace, or gone."""
        if self.host_proc is None:
            return pid
        chain = ns_pids(self.host_proc, pid)
        if not chain:
            return None
        ours = chain[-1]
        started = start_time(self.host_proc, pid)
        return ours if started is not None and start_time(self.own_proc, ours) == started else None

    def translate(self, processes: dict[int, dict[int, int]]) -> dict[int, dict[int, int]]:
        if self.host_proc is None:
            return processes
        own = {pid: self.own_pid(pid) for pid in processes}
        return {ours: processes[pid] for pid, ours in own.items() if ours is not None}


class GpuSource(Protocol):
    available: bool
    pids: PidMap  # how the PIDs processes() names become ours

    def processes(self) -> dict[int, dict[int, int]]: ...
    def readings(self) -> list[GpuReading]: ...


@dataclass(frozen=True)
class GpuSnapshot:
    """One tick's NVML reads, shared by every worker: GPU memory per pid (ours) per device, and the devices."""

    processes: dict[int, dict[int, int]]
    readings: list[GpuReading]

    def memory_of(self, pid: int) -> int | None:
        """None when NVML does not list the process: it is not on a GPU (yet)."""
        devices = self.processes.get(pid)
        return sum(devices.values()) if devices is not None else None

    def devices_of(self, pid: int) -> set[int]:
        return set(self.processes.get(pid, {}))

    def temperature(self, index: int) -> int | None:
        return next((r.temperature_c for r in self.readings if r.index == index), None)


def snapshot(source: GpuSource) -> GpuSnapshot | None:
    """None without a GPU: absent, not zero."""
    if not source.available:
        return None
    return GpuSnapshot(source.pids.translate(source.processes()), source.readings())


def unseen_workers(gpus: GpuSnapshot, workers: set[int], pids: PidMap) -> str:
    """Why the workers' GPU memory cannot be seen, for the log and status; "" when nothing says so."""
    if not pids.blind or not workers or not gpus.processes or workers & gpus.processes.keys():
        return ""
    devices = ", ".join(str(i) for i in sorted({i for d in gpus.processes.values() for i in d}))
    return (f"NVML lists {len(gpus.processes)} process(es) on GPU {devices} by the host's PIDs, none of them a "
            f"worker of this daemon, which runs in a PID namespace of its own: a model on the GPU has no GPU "
            f"memory figure (max_gpu_memory, leak_threshold) and no temperature lines. Run the pod with "
            f"hostPID: true, or mount the host's /proc read-only at {HOST_PROC}")


class Nvml:
    """The real source. pynvml's queries take ~0.3 ms each on an H100."""

    def __init__(self, pynvml, handles: list, pids: PidMap | None = None) -> None:
        self._nvml = pynvml
        self._handles = handles
        self.available = bool(handles)
        self.pids = pids or PidMap()

    @classmethod
    def open(cls) -> "Nvml":
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, no device: all mean "no GPU here"
            return cls(None, [])
        return cls(pynvml, handles, PidMap.detect())

    def processes(self) -> dict[int, dict[int, int]]:
        """Bytes of GPU memory per pid (the host's) per device index (a worker may span several devices)."""
        used: dict[int, dict[int, int]] = {}
        for index, handle in enumerate(self._handles):
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except self._nvml.NVMLError:
                continue
            for p in processes:
                used.setdefault(p.pid, {})[index] = p.usedGpuMemory or 0
        return used

    def readings(self) -> list[GpuReading]:
        out = []
        for index, handle in enumerate(self._handles):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append(GpuReading(
                    index=index,
                    temperature_c=self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU),
                    throttle_reasons=self._nvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
                    memory_used=memory.used,
                    memory_total=memory.total,
                ))
            except self._nvml.NVMLError:
                continue
        return out


class FedGpu:
    """A GPU source whose readings a test sets: the only stand-in for hardware CI does not have. Its PIDs
    are the daemon's own unless `pids` says how they map (a test of NVML seen from a container)."""

    def __init__(self, pids: PidMap | None = None) -> None:
        self.available = True
        self.pids = pids or PidMap()
        self.memory: dict[int, dict[int, int]] = {}  # pid → {device index: bytes}
        self.gpus: list[GpuReading] = []

    def processes(self) -> dict[int, dict[int, int]]:
        return {pid: dict(devices) for pid, devices in self.memory.items()}

    def readings(self) -> list[GpuReading]:
        return list(self.gpus)
