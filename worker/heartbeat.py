"""Proof of progress, read from outside: a CLOCK_MONOTONIC timestamp in a small shared file.

The worker stamps it per generated token and per prompt batch; the supervisor reads it each poll. A
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


class Heartbeat:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.beat()

    def beat(self) -> None:
        # One 8-byte store into a shared page: no syscall, cheap enough for every token.
        self._map[:_SIZE] = struct.pack(_FORMAT, time.monotonic())


def read_beat(path: str) -> float | None:
    """The last stamp, or None when there is none (not written yet, or the worker is gone)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE)
    except OSError:
        return None
    return struct.unpack(_FORMAT, data)[0] if len(data) == _SIZE else None
