"""Proof of progress, read from outside: a CLOCK_MONOTONIC timestamp in a small shared file.

The worker stamps it per decode step (one token for every generating sequence, or one prompt chunk) and
with it the state of its KV pool; the supervisor reads it each poll and for status. A
worker stuck in a C call stops stamping even though its process (and its gRPC threads) look alive —
gunicorn's heartbeat idea, but tied to progress, not to an event loop. CLOCK_MONOTONIC is system-wide
on Linux, so both processes compare the same clock.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

_FORMAT = "d"
_SIZE = struct.calcsize(_FORMAT)
_POOL = "5Q"  # after the stamp: sequences active, cells used, sequences cached, preemptions, cells high-water
_POOL_SIZE = struct.calcsize(_POOL)


class Heartbeat:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _SIZE + _POOL_SIZE)
            self._map = mmap.mmap(fd, _SIZE + _POOL_SIZE)
        finally:
            os.close(fd)
        self.beat()

    def beat(self, pool=None) -> None:
        """`pool`: the batch loop's PoolStats after a step; None keeps the last ones."""
        # Stores into a shared page: no syscall, cheap enough for every step. The pool goes first, so a
        # reader that sees the new stamp sees the pool that came with it or a newer one.
        if pool is not None:
            self._map[_SIZE:] = struct.pack(_POOL, pool.active, pool.cells, pool.cached, pool.preemptions,
                                            pool.cells_high)
        self._map[:_SIZE] = struct.pack(_FORMAT, time.monotonic())


def read_beat(path: str) -> float | None:
    """The last stamp, or None when there is none (not written yet, or the worker is gone)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE)
    except OSError:
        return None
    return struct.unpack(_FORMAT, data)[0] if len(data) == _SIZE else None


def read_pool(path: str) -> tuple[int, int, int, int, int] | None:
    """(sequences active, cells used, sequences cached, preemptions, cells high-water) as of the worker's
    last step."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE + _POOL_SIZE)
    except OSError:
        return None
    return struct.unpack(_POOL, data[_SIZE:]) if len(data) == _SIZE + _POOL_SIZE else None
