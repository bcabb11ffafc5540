"""Decisions and state changes as events: one call writes the log line and feeds WatchEvents.

Followers (WatchEvents streams) get a bounded queue each through a Fanout: one that does not keep up
is ended with the count of events it did not read, and never slows the supervisor down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from supervisor.observe.fanout import Fanout

log = structlog.get_logger("llm_supervisor.events")


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
        self.followers: Fanout[Event] = Fanout()
        self._clock = clock

    def emit(self, kind: str, model: str, level: str = "info", worker_pid: int = 0, reason: str = "",
             state: str = "", **figures: Any) -> Event | None:
        getattr(log, level)(kind, model=model, worker_pid=worker_pid, reason=reason, state=state, **figures)
        if level == "debug":
            return None  # routine (READY ⇄ BUSY twice a request): not worth a subscriber's attention
        event = Event(kind, model, worker_pid, reason, state, figures, self._clock())
        self.followers.publish(event)
        return event
