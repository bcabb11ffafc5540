"""One producer, many followers (WatchEvents, `llmctl tail -f`), none of whom may slow the producer.

Each follower gets a bounded queue; one that does not keep up loses its oldest items (counted in
`dropped`). None in a queue is the end of its stream.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Fanout(Generic[T]):
    def __init__(self, size: int = 1000) -> None:
        self._followers: set[asyncio.Queue[T | None]] = set()
        self._size = size
        self.dropped = 0

    def publish(self, item: T | None) -> None:
        for queue in self._followers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(item)

    def close(self) -> None:
        """End every follower's stream: a follower must not hold up an unload or a shutdown."""
        self.publish(None)

    def follow(self) -> asyncio.Queue[T | None]:
        queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize=self._size)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[T | None]) -> None:
        self._followers.discard(queue)
