"""One replica's request queue: a worker serves one request at a time (its KV cache is one sequence).

An asyncio.Lock wakes its waiters first in, first out, so holding it is a FIFO place in line. The
runtime operates it (supervisor/serving/runtime.py); the replica only reads how loaded it is, for
keep_alive and eviction.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


class RequestQueue:
    def __init__(self) -> None:
        self._slot = asyncio.Lock()
        self.waiting = 0  # requests in line for the slot, or holding it and waiting at a door (a hot GPU)

    @property
    def running(self) -> bool:
        return self._slot.locked()

    @property
    def load(self) -> int:
        """Requests on it: the one running, and those waiting."""
        return int(self._slot.locked()) + self.waiting

    async def enter(self) -> None:
        """Wait for this request's turn (the caller leaves with `leave`)."""
        await self.counted(self._slot.acquire())

    def leave(self) -> None:
        self._slot.release()

    async def counted(self, waited: Awaitable[T]) -> T:
        """`waited`, with the request counted as waiting meanwhile: what anyone looking at the queue sees."""
        self.waiting += 1
        try:
            return await waited
        finally:
            self.waiting -= 1

    async def drain(self, timeout: float) -> bool:
        """Until every request in line or in flight has finished (True), or `timeout` (False). Once this
        holds the slot, everything that queued before has been served; it keeps the slot, so nothing else
        runs until `leave`."""
        try:
            await asyncio.wait_for(self._slot.acquire(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
