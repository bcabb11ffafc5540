"""One model at run time: its worker, the FIFO queue in front of it, and the path of a request.

A worker serves one request at a time (its KV cache is one sequence), so the queue is an asyncio.Lock,
which wakes waiters first in, first out. A request that never reached the client when its worker died
is retried once on a fresh worker; one that had already streamed text fails with UNAVAILABLE and the
reason — never a silently short answer.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc
import structlog

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2

from .config import ModelConfig
from .errors import ApiError, exhausted, unavailable
from .gguf_file import GGUFInfo
from .manager import Spawn, WorkerProcess
from .states import WorkerState

log = structlog.get_logger("llm_supervisor.scheduler")

# How long to wait for a worker whose stream broke to be reaped, to tell its exit reason.
DEATH_REAP_S = 3.0


class ModelRuntime:
    def __init__(self, config: ModelConfig, gguf: GGUFInfo, socket_dir: Path, source: str,
                 on_change: Callable[["ModelRuntime"], None] = lambda rt: None) -> None:
        self.config = config
        self.gguf = gguf
        self.source = source
        self.worker: WorkerProcess | None = None
        self.restarts = 0
        self.last_exit = ""
        self.fatal_reason = ""
        self.waiting = 0
        self.closed = False
        self._socket_dir = socket_dir
        self._serial = itertools.count(1)
        self._slot = asyncio.Lock()
        self._starting: asyncio.Task[WorkerProcess] | None = None
        self._on_change = on_change

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> str:
        if self.fatal_reason:
            return WorkerState.FATAL.value
        return self.worker.state.value if self.worker else WorkerState.EXITED.value

    @property
    def serving(self) -> bool:
        return self.worker is not None and self.worker.state in (WorkerState.READY, WorkerState.BUSY)

    # -- worker lifecycle ----------------------------------------------------------------------------
    async def start(self) -> WorkerProcess:
        """Start a worker (or join the start in progress). Raises ApiError when it cannot load."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._spawn())
        return await asyncio.shield(self._starting)

    async def _spawn(self) -> WorkerProcess:
        socket_path = self._socket_dir / f"{self.name}.{next(self._serial)}.sock"
        worker = WorkerProcess(Spawn(self.config, self.gguf.path, socket_path))
        # The previous worker's channel is left to the garbage collector: closing it while a request
        # may still be reading its last call would cancel that call under the request's feet.
        self.worker = worker
        self.fatal_reason = ""
        try:
            await worker.start()
        except ApiError as e:
            self.fatal_reason = e.message
            self._on_change(self)
            raise
        asyncio.create_task(self._supervise(worker), name=f"supervise-{worker.pid}")
        self._on_change(self)
        return worker

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Edge-triggered on a worker's exit: an exit nobody asked for is a crash; start a replacement."""
        await worker.exited.wait()
        self.last_exit = worker.exit_reason
        self._on_change(self)
        if self.closed or worker.stop_requested or worker is not self.worker:
            return
        self.restarts += 1
        log.warning("worker_crashed", model=self.name, worker_pid=worker.pid, reason=worker.exit_reason,
                    restarts=self.restarts)
        try:
            await self.start()
        except ApiError as e:
            log.error("worker_restart_failed", model=self.name, reason=e.message)

    async def _ready_worker(self) -> WorkerProcess:
        worker = self.worker
        if worker is not None and worker.state == WorkerState.READY:
            return worker
        if self.closed:
            raise unavailable(f"model {self.name!r} is being unloaded")
        if self._starting is not None and not self._starting.done():
            return await asyncio.shield(self._starting)
        return await self.start()

    async def stop(self, grace: float = 5.0) -> None:
        self.closed = True
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop(grace)
        self._on_change(self)

    # -- requests ------------------------------------------------------------------------------------
    async def _enter_queue(self) -> None:
        if self._slot.locked() and self.waiting >= self.config.max_queue:
            raise exhausted(f"model {self.name!r}: queue is full ({self.waiting} waiting, max_queue = "
                            f"{self.config.max_queue}); retry later or raise max_queue")
        self.waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self.waiting -= 1

    async def generate(self, request: worker_pb2.WorkerGenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        await self._enter_queue()
        try:
            for attempt in (1, 2):
                worker = await self._ready_worker()
                sent = False
                if worker.state == WorkerState.READY:  # it may have died since: the call below then says how
                    worker.change_state(WorkerState.BUSY, "request")
                call = worker.stub.Generate(request, timeout=self.config.request_timeout)
                try:
                    async for chunk in call:
                        sent = True
                        yield chunk
                    worker.requests_served += 1
                    return
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                        raise  # our own client went away
                    # A CancelledError we did not ask for means the call's channel closed: the worker is gone.
                    error, died = await self._explain(worker, e if isinstance(e, grpc.aio.AioRpcError) else None)
                    if died and not sent and attempt == 1:
                        log.warning("request_retried", model=self.name, worker_pid=worker.pid, reason=error.message)
                        continue
                    raise error from None
                finally:
                    call.cancel()  # a no-op when it completed; stops the worker's loop when we were cancelled
                    if worker.state == WorkerState.BUSY:
                        worker.change_state(WorkerState.READY, "request done")
        finally:
            self._slot.release()

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        worker = await self._ready_worker()
        try:
            return await worker.stub.Tokenize(request, timeout=30)
        except grpc.aio.AioRpcError as e:
            raise (await self._explain(worker, e))[0] from None

    async def _explain(self, worker: WorkerProcess, e: grpc.aio.AioRpcError | None) -> tuple[ApiError, bool]:
        """Turn a failed worker call into what the client should read, and whether the worker died."""
        code = e.code() if e is not None else grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ApiError(code, f"model {self.name!r}: request ran past request_timeout "
                                  f"({self.config.request_timeout:g} s)"), False
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL):
            return ApiError(code, e.details() or code.name), False  # the worker refused the request itself
        if not await worker.wait_exit(DEATH_REAP_S):
            if code != grpc.StatusCode.UNAVAILABLE:
                return ApiError(code, e.details() or code.name), False
            worker.kill()  # alive but its socket broke: it is no use to anyone
            await worker.wait_exit(DEATH_REAP_S)
            reason = f"stopped answering and was killed ({worker.exit_reason})"
        else:
            reason = worker.exit_reason
        return unavailable(f"model {self.name!r}: worker pid {worker.pid} died mid-request: {reason}"), True
