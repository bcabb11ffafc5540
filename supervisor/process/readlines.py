"""Lines of a child's output, however long.

asyncio's StreamReader refuses a line longer than its 64 KiB limit (ValueError), and llama.cpp prints a
model's metadata — a chat template of hundreds of KB included — as one line: the reader would die there
and the worker's "listening" line would never be seen. Here a long line is kept up to `limit` bytes, and
the rest of it is skipped, with a note of how much.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

LINE_LIMIT = 16 * 1024  # bytes of one line kept for the log; the rest is counted, not kept
CHUNK = 64 * 1024


async def read_lines(stream: asyncio.StreamReader, limit: int = LINE_LIMIT) -> AsyncIterator[str]:
    """Each line (without its newline), decoded leniently; one longer than `limit` bytes is cut there
    and ends with "… [N bytes more]". The last line may lack a newline. Memory stays within a chunk
    plus `limit`, whatever the child prints."""
    pending = bytearray()  # the start of the current line, at most `limit` bytes
    skipped = 0            # bytes of the current line past `limit`
    while chunk := await stream.read(CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            yield _line(pending, chunk[start:end], skipped, limit)
            pending.clear()
            skipped = 0
            start = end + 1
        rest = chunk[start:]
        room = max(0, limit - len(pending))
        pending += rest[:room]
        skipped += len(rest) - min(len(rest), room)
    if pending or skipped:
        yield _line(pending, b"", skipped, limit)


def _line(pending: bytearray, tail: bytes, skipped: int, limit: int) -> str:
    whole = bytes(pending) + tail
    skipped += max(0, len(whole) - limit)
    text = whole[:limit].decode("utf-8", "replace").rstrip("\r")
    return f"{text}… [{skipped} bytes more]" if skipped else text
