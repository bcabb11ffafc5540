"""GPU readings through NVML — the one seam tests feed, since CI has no GPU.

No GPU, no driver or no NVML library is a normal state: `Nvml.open()` returns an object whose readings
are empty, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuReading:
    index: int
    temperature_c: int
    throttle_reasons: int  # NVML's clocks-event bitmask; 0 = running free
    memory_used: int
    memory_total: int


class GpuSource(Protocol):
    available: bool

    def processes(self) -> dict[int, dict[int, int]]: ...
    def readings(self) -> list[GpuReading]: ...


@dataclass(frozen=True)
class GpuSnapshot:
    """One tick's NVML reads, shared by every worker: GPU memory per pid per device, and the devices."""

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
    return GpuSnapshot(source.processes(), source.readings()) if source.available else None


class Nvml:
    """The real source. pynvml's queries take ~0.3 ms each on an H100."""

    def __init__(self, pynvml, handles: list) -> None:
        self._nvml = pynvml
        self._handles = handles
        self.available = bool(handles)

    @classmethod
    def open(cls) -> "Nvml":
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, no device: all mean "no GPU here"
            return cls(None, [])
        return cls(pynvml, handles)

    def processes(self) -> dict[int, dict[int, int]]:
        """Bytes of GPU memory per pid per device index (a worker may span several devices)."""
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
    """A GPU source whose readings a test sets: the only stand-in for hardware CI does not have."""

    def __init__(self) -> None:
        self.available = True
        self.memory: dict[int, dict[int, int]] = {}  # pid → {device index: bytes}
        self.gpus: list[GpuReading] = []

    def processes(self) -> dict[int, dict[int, int]]:
        return {pid: dict(devices) for pid, devices in self.memory.items()}

    def readings(self) -> list[GpuReading]:
        return list(self.gpus)
