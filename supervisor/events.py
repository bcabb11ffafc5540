"""Decisions and state changes as events: one call writes the log line and feeds WatchEvents.

Subscribers get a bounded queue each; one that does not keep up loses its oldest events (counted in
`dropped`) and never slows the supervisor down.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

log = structlog.get_logger("llm_supervisor.events")

QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Event:
    kind: str                  # worker_state, worker_recycle, worker_crashed, model_fatal, worker_idle_unload …
    model: str
    worker_pid: int = 0
    reason: str = ""
    state: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0          # unix seconds, for people; ordering is the stream's


class EventBus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._subscribers: set[asyncio.Queue] = set()
        self._clock = clock
        self.dropped = 0

    def emit(self, kind: str, model: str, level: str = "info", worker_pid: int = 0, reason: str = "",
             state: str = "", **figures: Any) -> Event | None:
        getattr(log, level)(kind, model=model, worker_pid=worker_pid, reason=reason, state=state, **figures)
        if level == "debug":
            return None  # routine (READY ⇄ BUSY twice a request): not worth a subscriber's attention
        event = Event(kind, model, worker_pid, reason, state, figures, self._clock())
        self._publish(event)
        return event

    def _publish(self, event: Event | None) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def close(self) -> None:
        """End every subscriber's stream (None is the end): a follower must not hold up a shutdown."""
        self._publish(None)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)
