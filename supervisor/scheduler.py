"""One model at run time: its replicas (a worker each), the FIFO queues in front of them, and the path
of a request.

A worker serves one request at a time (its KV cache is one sequence), so each replica's queue is an
asyncio.Lock, which wakes waiters first in, first out. A request goes to the least-loaded replica that
serves; `max_queue` bounds the requests waiting across all of them. A request that never reached the client when its worker died
is retried once on a fresh worker; one that had already streamed text fails with UNAVAILABLE and the
reason — never a silently short answer.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2

from .config import ModelConfig
from .errors import ApiError, exhausted, unavailable
from .estimate import Estimate
from .gguf_file import GGUFInfo
from .lifecycle import KILL_GRACE_S, Lifecycle
from .manager import WorkerProcess
from .output import OutputLog

log = structlog.get_logger("llm_supervisor.scheduler")

# How long to wait for a worker whose stream broke to be reaped, to tell its exit reason.
DEATH_REAP_S = 3.0


class ModelRuntime:
    def __init__(self, source: str, replicas: list[Lifecycle]) -> None:
        self.source = source  # "config", "api" or "state"
        self.replicas = replicas
        self.last_tokens_per_second = 0.0

    # The lifecycles hold the settings: a reload changes them there, for the next worker each starts.
    @property
    def config(self) -> ModelConfig:
        return self.replicas[0].config

    @property
    def gguf(self) -> GGUFInfo:
        return self.replicas[0].gguf

    @property
    def output(self) -> OutputLog:
        return self.replicas[0].output

    @property
    def serving(self) -> bool:
        return any(life.serving for life in self.replicas)

    @property
    def accepting(self) -> bool:
        return any(life.accepting for life in self.replicas)

    @property
    def waiting(self) -> int:
        return sum(life.waiting for life in self.replicas)

    @property
    def state(self) -> str:
        """READY while a replica takes requests at once, BUSY while all that serve are busy; else the first's."""
        serving = [life.state for life in self.replicas if life.serving]
        if serving:
            return "READY" if "READY" in serving else "BUSY"
        return self.replicas[0].state

    def pick(self) -> Lifecycle:
        """The replica for the next request: one that serves (else one that may start), least loaded."""
        return min(self.replicas, key=lambda life: (not life.serving, life.load))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def estimate(self) -> Estimate:
        return self.replicas[0].estimate  # the replicas share their settings

    async def stop(self, grace: float = 5.0, drain: float = 0.0, reason: str = "is being unloaded") -> None:
        """Every replica, as Lifecycle.stop does."""
        await asyncio.gather(*(life.stop(grace, drain, reason) for life in self.replicas))

    # -- requests ------------------------------------------------------------------------------------
    async def _enter_queue(self, life: Lifecycle) -> None:
        if life.slot.locked() and self.waiting >= self.config.max_queue:
            raise exhausted(f"model {self.name!r}: queue is full ({self.waiting} waiting, max_queue = "
                            f"{self.config.max_queue}); retry later or raise max_queue")
        life.waiting += 1
        try:
            await life.slot.acquire()
        finally:
            life.waiting -= 1

    async def generate(self, request: worker_pb2.WorkerGenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        life = self.pick()
        await self._enter_queue(life)
        try:
            await life.admitted()  # a GPU past temperature_throttle: wait here, first in line
            for attempt in (1, 2):
                worker = await life.ready_worker()
                sent = False
                worker.begin_request()
                call = worker.stub.Generate(request, timeout=self.config.request_timeout)
                try:
                    async for chunk in call:
                        sent = True
                        if chunk.HasField("usage"):  # the last chunk: how far this request filled the context
                            worker.context_high = max(worker.context_high,
                                                      chunk.usage.prompt_tokens + chunk.usage.completion_tokens)
                        yield chunk
                    worker.requests_served += 1
                    try:
                        life.after_request(worker)
                    except Exception:  # the watchdog's trouble must never fail a request that succeeded
                        log.exception("after_request_failed", model=self.name)
                    return
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                        raise  # our own client went away
                    # A CancelledError we did not ask for means the call's channel closed: the worker is gone.
                    error, died = await self._explain(life, worker, e if isinstance(e, grpc.aio.AioRpcError) else None)
                    if died and not sent and attempt == 1:
                        log.warning("request_retried", model=self.name, worker_pid=worker.pid, reason=error.message)
                        continue
                    raise error from None
                finally:
                    call.cancel()  # a no-op when it completed; stops the worker's loop when we were cancelled
                    worker.end_request()
        finally:
            life.used()  # before the slot is free: keep_alive never sees it idle with an old clock
            life.slot.release()

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        life = self.pick()
        worker = await life.ready_worker()
        try:
            return await worker.stub.Tokenize(request, timeout=30)
        except grpc.aio.AioRpcError as e:
            raise (await self._explain(life, worker, e))[0] from None

    async def _explain(self, life: Lifecycle, worker: WorkerProcess,
                       e: grpc.aio.AioRpcError | None) -> tuple[ApiError, bool]:
        """Turn a failed worker call into what the client should read, and whether the worker died."""
        code = e.code() if e is not None else grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # A worker past the deadline may be hung in a C call that never sees the cancel: replace it.
            reason = f"request ran past request_timeout ({self.config.request_timeout:g} s)"
            life.recycle_now(worker, reason, grace=KILL_GRACE_S, kind="timeout")
            return ApiError(code, f"model {self.name!r}: {reason}; its worker pid {worker.pid} is being replaced"), False
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
        if life.closed:  # unloaded or shut down with this request unfinished at the drain's end
            return unavailable(f"model {self.name!r} {life.closed_reason}; the request did not finish "
                               f"in time (worker pid {worker.pid}: {reason})"), False
        return unavailable(f"model {self.name!r}: worker pid {worker.pid} died mid-request: {reason}"), True
