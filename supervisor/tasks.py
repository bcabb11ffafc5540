"""Tasks that nobody awaits, held until they end.

asyncio keeps only weak references to tasks: one created and dropped may be collected mid-flight, and
its exception is then never seen. Whatever starts work it does not await keeps it here.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Awaitable

import structlog

from supervisor.errors import ApiError

log = structlog.get_logger("llm_supervisor.tasks")


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def keep(self, work: Awaitable, name: str = "") -> asyncio.Task:
        # A coroutine runs in a context of its own: work that outlives a request is not that request's
        # (its log lines would carry the request's labels).
        task = (asyncio.get_running_loop().create_task(work, context=contextvars.Context())
                if asyncio.iscoroutine(work) else asyncio.ensure_future(work))
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        # An ApiError is an answer, given to whoever awaited the task; anything else is a bug to see.
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), ApiError):
            log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))

    def __len__(self) -> int:
        return len(self._tasks)
