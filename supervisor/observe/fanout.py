"""One producer, many followers (WatchEvents, `llmctl tail -f`), none of whom may slow the producer.

Each follower gets a queue of at most `size` unread items. One that falls that far behind is ended at
once: its unread items are freed and its reader learns how many it did not read (FellBehind). So a
follower reads every item or is told it did not; no silent gap, no queue that grows. How many may
follow at once is the API's to bound (`max_followers`, with `too_many_followers`).
"""

from __future__ import annotations

import asyncio
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")

QUEUED = 1000  # unread items a follower may have before it is ended


class FellBehind(Exception):
    def __init__(self, unread: int) -> None:
        super().__init__(f"fell behind: {unread} not read")
        self.unread = unread


class Follower(Generic[T]):
    def __init__(self, size: int) -> None:
        # Unbounded as a queue: `offer` keeps it within `size`, so the end of the stream always fits.
        self._queue: asyncio.Queue[T | None] = asyncio.Queue()
        self._size = size
        self.unread = 0  # set when it fell behind: the items it did not read

    def offer(self, item: T) -> bool:
        """Queue the item; False, and the follower ended, when it already has `size` unread."""
        if self._queue.qsize() >= self._size:
            self.unread = self._queue.qsize() + 1
            while not self._queue.empty():  # freed now, not when its reader gets round to it
                self._queue.get_nowait()
            self.end()
            return False
        self._queue.put_nowait(item)
        return True

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def get(self) -> T | None:
        """The next item, or None at the end of the stream. FellBehind if it was ended for falling behind."""
        item = await self._queue.get()
        if item is None and self.unread:
            raise FellBehind(self.unread)
        return item


class Fanout(Generic[T]):
    def __init__(self, size: int = QUEUED) -> None:
        self._followers: set[Follower[T]] = set()
        self._size = size
        self.dropped = 0  # items not read by followers that fell behind

    def __len__(self) -> int:
        return len(self._followers)

    def publish(self, item: T) -> None:
        for follower in list(self._followers):
            if not follower.offer(item):
                self._followers.discard(follower)
                self.dropped += follower.unread

    def close(self) -> None:
        """End every follower's stream: a follower must not hold up an unload or a shutdown."""
        for follower in self._followers:
            follower.end()
        self._followers.clear()

    def follow(self) -> Follower[T]:
        follower: Follower[T] = Follower(self._size)
        self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower[T]) -> None:
        self._followers.discard(follower)


def too_many_followers(fanouts: Iterable[Fanout], limit: int) -> str:
    """Why one more follower is refused (RESOURCE_EXHAUSTED's message); empty when it may follow.
    Counted over every fanout together: each follower holds a queue, whichever stream it follows."""
    following = sum(len(fanout) for fanout in fanouts)
    if following < limit:
        return ""
    return (f"too many followers: {following} streams already follow events or model output (max_followers = "
            f"{limit}); end one (llmctl events, llmctl tail -f) or raise [supervisor] max_followers")
