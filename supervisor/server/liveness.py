"""Liveness: whether the daemon's own loops run — what a restart would cure.

Readiness (grpc.health.v1's "" and the Supervisor service) says whether the daemon takes requests: not
before its models are loaded, not while it drains. Liveness (the `liveness` service) says whether the
watch loop completes its passes: every recycle, unload, hang and temperature check happens there, so a
loop that died or hangs leaves the machine unguarded while requests still succeed. It is what kubelet's
liveness probe asks, and WATCHDOG=1 is sent only when it holds. A model recycling with its replacement
on the way is neither: requests wait in its queue.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

LIVENESS_SERVICE = "liveness"
STALL_MIN_S = 2.0  # the least silence that counts as a stall, however short poll_interval is


@dataclass
class WatchPasses:
    """How the watch loop's passes go: the monotonic time of the last one completed, and failures."""

    last_completed: float
    failures: int = 0  # passes that raised, since start
    failing: int = 0   # in a row, up to now: 0 once a pass completes

    def completed(self, now: float) -> None:
        self.last_completed = now
        self.failing = 0

    def failed(self) -> None:
        self.failures += 1
        self.failing += 1


def stalled(last_completed: float, now: float, interval: float) -> bool:
    """Three passes' worth of time without a completed one: hung, or failing every time."""
    return now - last_completed > max(STALL_MIN_S, 3 * interval)


async def report_liveness(passes: WatchPasses, interval: Callable[[], float], report: Callable[[bool], None],
                          clock: Callable[[], float]) -> None:
    """Calls `report(alive)` whenever liveness changes (first at once). Runs beside the watch loop, not in
    it: a pass hung in an NVML call must not be what decides whether that pass is hung."""
    alive: bool | None = None
    while True:
        now_alive = not stalled(passes.last_completed, clock(), interval())
        if now_alive != alive:
            alive = now_alive
            report(alive)
        await asyncio.sleep(min(1.0, max(0.05, interval() / 2)))
