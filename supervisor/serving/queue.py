"""One replica's request queue: its worker generates up to `parallel` requests at once (one sequence
each in its KV pool); the others wait here, first in, first out.

A place is handed straight to the next in line when one leaves, so a request arriving at that moment
cannot overtake those waiting. The runtime operates it (supervisor/serving/runtime.py); the replica only
reads how loaded it is, for keep_alive and eviction.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class RequestQueue:
    def __init__(self, capacity: Callable[[], int] = lambda: 1) -> None:
        self._capacity = capacity  # the model's `parallel`, read each time: a reload may change it
        self.running = 0  # requests holding a place: sent to the worker, or about to be
        self.waiting = 0  # requests in line, or holding a place and waiting at a door (a hot GPU)
        self._line: collections.deque[asyncio.Future] = collections.deque()
        self._drained = 0

    def capacity_from(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._hand_on()

    def refresh(self) -> None:
        """The capacity may have grown (a reload): let waiting requests in."""
        self._hand_on()

    @property
    def capacity(self) -> int:
        return max(1, self._capacity())

    @property
    def full(self) -> bool:
        """A request arriving now would wait."""
        return self.running >= self.capacity or bool(self._line)

    @property
    def load(self) -> int:
        """Requests on it: those running, and those waiting."""
        return self.running + self.waiting

    async def enter(self) -> None:
        """Wait for this request's turn (the caller leaves with `leave`)."""
        await self.counted(self._acquire())

    def leave(self) -> None:
        self.running -= 1
        self._hand_on()

    async def counted(self, waited: Awaitable[T]) -> T:
        """`waited`, with the request counted as waiting meanwhile: what anyone looking at the queue sees."""
        self.waiting += 1
        try:
            return await waited
        finally:
            self.waiting -= 1

    async def _acquire(self) -> None:
        if not self.full:
            self.running += 1
            return
        place = asyncio.get_running_loop().create_future()
        self._line.append(place)
        try:
            await place  # _hand_on counted us as running when it resolved this
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():
                self.leave()  # handed a place as the cancel came: pass it on
            else:
                if place in self._line:  # _hand_on may have dropped it already, as cancelled
                    self._line.remove(place)
                self._hand_on()
            raise

    def _hand_on(self) -> None:
        while self._line and self.running < self.capacity:
            place = self._line.popleft()
            if not place.done():
                self.running += 1
                place.set_result(None)

    async def drain(self, timeout: float) -> bool:
        """Until every request in line or in flight has finished (True), or `timeout` (False). Once this
        holds every place, everything that queued before has been served; it keeps them, so nothing else
        runs until `reopen`."""
        taken = 0
        try:
            async with asyncio.timeout(timeout):
                for _ in range(self.capacity):
                    await self._acquire()
                    taken += 1
        except TimeoutError:
            for _ in range(taken):
                self.leave()
            return False
        self._drained = taken
        return True

    def reopen(self) -> None:
        """Give back the places a successful `drain` holds."""
        taken, self._drained = self._drained, 0
        for _ in range(taken):
            self.leave()
