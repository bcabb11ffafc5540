"""The door a model's GPUs keep: shut while one is past a temperature line, open once it has cooled.

The levels come from policies.heat_level (pure); this holds them per GPU, remembers which GPUs the
model's workers run on (NVML says; kept while the model is unloaded, so a model drained by a critical
GPU is not loaded onto it again before it cools) and lets requests and worker starts wait at the door.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from supervisor.errors import unavailable
from supervisor.observe.gpu import GpuSnapshot
from supervisor.decide.policies import Heat, Thermal, heat_level


@dataclass(frozen=True)
class Overheat:
    """A GPU that has just entered a higher level: what to say, and whether to drain."""

    level: Heat
    gpu: int
    temperature: int
    reason: str


class ThermalGate:
    def __init__(self, model: str) -> None:
        self.model = model
        self.gpus: set[int] = set()
        self.heat: dict[int, Heat] = {}
        self.temperatures: dict[int, int] = {}
        self.cool = asyncio.Event()  # set while the door is open
        self.cool.set()
        self.reason = ""  # why it is shut; empty while open

    @property
    def critical(self) -> bool:
        """One of the model's GPUs is past temperature_critical (and not yet cooled below it)."""
        return any(level == Heat.CRITICAL for index, level in self.heat.items() if index in self.gpus)

    @property
    def hottest(self) -> int | None:
        """The hottest of the model's GPUs at the last poll; None without one."""
        return max((t for i, t in list(self.temperatures.items()) if i in self.gpus), default=None)

    def update(self, gpus: GpuSnapshot, devices: set[int], thermal: Thermal) -> tuple[list[Overheat], str]:
        """One poll: the GPUs that rose a level (the door shuts with the last one's reason), and, when all
        are back to normal after the door was shut, the words for opening it ('' otherwise)."""
        if devices:
            self.gpus = devices
        rose = []
        for index in sorted(self.gpus):
            temperature = gpus.temperature(index)
            if temperature is None:
                continue
            self.temperatures[index] = temperature
            before = self.heat.get(index, Heat.NORMAL)
            now = self.heat[index] = heat_level(before, temperature, thermal)
            if now > before:
                critical = now == Heat.CRITICAL
                line, key = (thermal.critical, "temperature_critical") if critical else (thermal.throttle, "temperature_throttle")
                what = "draining and unloading" if critical else "no new requests"
                rose.append(Overheat(now, index, temperature,
                                     f"GPU {index} at {temperature} °C, at or above {key} ({line:g} °C): {what} until "
                                     f"it is below {line - thermal.hysteresis:g} °C"))
        for overheat in rose:
            self.reason = overheat.reason
            self.cool.clear()
        # Only the GPUs the model runs on now: one it has left must not keep the door shut for good.
        hottest = max((level for index, level in self.heat.items() if index in self.gpus), default=Heat.NORMAL)
        if not rose and hottest == Heat.NORMAL and not self.cool.is_set():
            self.reason = ""
            self.cool.set()
            temps = ", ".join(f"GPU {i} {t} °C" for i, t in sorted(self.temperatures.items()) if i in self.gpus)
            return rose, f"cooled ({temps}): admitting requests again"
        return rose, ""

    async def wait(self, what: str, timeout: float) -> None:
        """Until the door is open; UNAVAILABLE after `timeout` with the temperature that keeps it shut."""
        if self.cool.is_set():
            return
        try:
            await asyncio.wait_for(self.cool.wait(), timeout)
        except asyncio.TimeoutError:
            raise unavailable(f"model {self.model!r}: {what}: {self.reason}; "
                              f"waited request_timeout ({timeout:g} s)") from None
