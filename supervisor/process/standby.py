"""Spare worker processes: started ahead, with the runtime already imported, and handed to the next
worker start of any model. A recycle then waits for the model's load and warm-up only, not for a Python
interpreter and its imports (~0.2 s idle; several times that on cores busy serving requests).

A spare costs ~30 MiB of private memory and no CPU while it waits. It is refilled once the worker that
took it is serving, so the refill's imports do not compete with that worker's load.
"""

from __future__ import annotations

import asyncio
import os
import sys

import structlog

log = structlog.get_logger("llm_supervisor.standby")


async def spawn_worker_process(args: list[str], stdin: int) -> asyncio.subprocess.Process:
    """Every worker process, spare or fresh, starts the same way."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.main", *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: a signal to it reaches its children too
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


class StandbyPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self._spares: list[asyncio.subprocess.Process] = []
        self._filling: asyncio.Task | None = None
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._spares if p.returncode is None]

    def take(self) -> asyncio.subprocess.Process | None:
        """A live spare, or None (then the caller starts a fresh worker)."""
        while self._spares:
            spare = self._spares.pop(0)
            if spare.returncode is None:
                log.debug("standby_taken", worker_pid=spare.pid)
                return spare
        return None

    def refill(self) -> None:
        if self._closed or len(self._spares) >= self.size or (self._filling and not self._filling.done()):
            return
        self._filling = asyncio.create_task(self._fill(), name="standby-fill")

    async def _fill(self) -> None:
        while not self._closed and len(self._spares) < self.size:
            try:
                spare = await spawn_worker_process(["--standby", "--parent-pid", str(os.getpid())],
                                                   stdin=asyncio.subprocess.PIPE)
            except OSError as e:  # no spare is a slower recycle, never a failure
                log.warning("standby_failed", error=str(e))
                return
            self._spares.append(spare)
            log.info("standby_started", worker_pid=spare.pid)

    async def close(self, grace: float = 2.0) -> None:
        """EOF on stdin ends a spare; one that does not go within `grace` is killed."""
        self._closed = True
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)
        spares, self._spares = self._spares, []
        for spare in spares:
            if spare.stdin is not None:
                spare.stdin.close()
        for spare in spares:
            try:
                await asyncio.wait_for(spare.wait(), grace)
            except asyncio.TimeoutError:
                spare.kill()
                await spare.wait()
