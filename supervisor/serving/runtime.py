"""One model at run time: its replicas (a worker each), the request queue in front of each
(serving/queue.py), and the path of a request.

A request goes to the least-loaded replica that serves; `max_queue` bounds the requests waiting across
all of them. A request that never reached the client when its worker died is retried once on a fresh
worker; one that had already streamed text fails with UNAVAILABLE and the reason — never a silently
short answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc
import structlog

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2

from supervisor.settings.config import ModelConfig
from supervisor.errors import ApiError, QueueFull, unavailable
from supervisor.decide.estimate import Estimate
from supervisor.settings.gguf_file import GGUFInfo
from supervisor.process.output import OutputLog
from supervisor.process.worker_process import WorkerProcess
from supervisor.supervision.replica import Replica
from supervisor.supervision.states import ReplicaState

log = structlog.get_logger("llm_supervisor.runtime")

# How long to wait for a worker whose stream broke to be reaped, to tell its exit reason.
DEATH_REAP_S = 3.0
TOKENIZE_TIMEOUT_S = 30.0
# Beyond heartbeat_timeout, how long a cancelled request's place waits for its worker to free the sequence.
RELEASE_MARGIN_S = 5.0


class ModelRuntime:
    def __init__(self, source: str, replicas: list[Replica]) -> None:
        self.source = source  # "config", "api" or "state"
        self.replicas = replicas  # each with its RequestQueue (replica.queue), which only this operates
        self.last_tokens_per_second = 0.0

    # The replicas hold the settings: a reload changes them there, for the next worker each starts.
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
        return any(replica.serving for replica in self.replicas)

    @property
    def accepting(self) -> bool:
        return any(replica.accepting for replica in self.replicas)

    @property
    def waiting(self) -> int:
        return sum(replica.queue.waiting for replica in self.replicas)

    @property
    def state(self) -> str:
        """READY while a replica takes a request at once, BUSY while all that serve are full; else the first's."""
        serving = [replica for replica in self.replicas if replica.serving]
        if serving:
            return "READY" if any(not replica.queue.full for replica in serving) else "BUSY"
        return self.replicas[0].status

    def keep_alive(self, seconds: float) -> None:
        """How long the model stays after the request now coming (Ollama's keep_alive)."""
        for replica in self.replicas:
            replica.keep_alive = seconds

    def pick(self) -> Replica:
        """The replica for the next request: one that serves (else one that may start), least loaded."""
        return min(self.replicas, key=lambda replica: (not replica.serving, replica.queue.load))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def estimate(self) -> Estimate:
        return self.replicas[0].estimate  # the replicas share their settings

    async def stop(self, grace: float = 5.0, drain: float = 0.0, reason: str = "is being unloaded",
                   replicas: list[Replica] | None = None) -> None:
        """Stop every replica (or those given) for good, after `drain` seconds at most for the requests
        already queued or in flight; what is still running then fails with UNAVAILABLE and `reason`."""
        chosen = self.replicas if replicas is None else replicas
        await asyncio.gather(*(self._stop_one(replica, grace, drain, reason) for replica in chosen))

    @staticmethod
    async def _stop_one(replica: Replica, grace: float, drain: float, reason: str) -> None:
        queue = replica.queue
        drained = drain > 0 and await queue.drain(drain)
        await replica.stop(grace, reason)
        if drained:
            queue.reopen()  # a request that queued after the drain now learns the model is gone

    # -- requests ------------------------------------------------------------------------------------
    async def _enter_queue(self, replica: Replica, keep_alive: float | None = None) -> None:
        if replica.queue.full and self.waiting >= self.config.max_queue:
            raise QueueFull(f"model {self.name!r}: queue is full ({self.waiting} waiting, max_queue = "
                            f"{self.config.max_queue}); retry later or raise max_queue")
        await replica.queue.enter()
        if keep_alive is not None:  # admitted: a request refused or cancelled while waiting changes nothing
            self.keep_alive(keep_alive)

    async def generate(self, request: worker_pb2.WorkerGenerateRequest, keep_alive: float | None = None,
                       arrived: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """The request's chunks. `keep_alive`: how long the model stays after it, set once it is admitted
        (a request refused at the queue changes nothing). `arrived` (time.monotonic): when the request
        came, if before this call (it waited for the model's load on demand); the last chunk's
        usage.load_s counts from there to the worker's readiness, when that came after it."""
        arrived = time.monotonic() if arrived is None else arrived
        replica = self.pick()
        await self._enter_queue(replica, keep_alive)
        unfinished: WorkerProcess | None = None  # a live worker still holding this request's sequence
        request_id = 0
        try:
            await self._until_cool(replica)
            for attempt in (1, 2):
                if unfinished is not None:  # the first attempt's worker was killed: it frees nothing more
                    replica.keep(self._release(replica, unfinished, request_id, leave=False),
                                 f"release-{unfinished.pid}-{request_id}")
                    unfinished = None
                worker = await self._ready(replica)
                # Up to the worker's readiness, if that came after the request: the load it waited for,
                # not the queue behind requests already running on a ready worker.
                ready_at = worker.ready_at or time.monotonic()
                load_s = max(ready_at - arrived, 0.0)
                sent = measured = completed = False
                request_id = request.request_id = worker.new_request_id()
                worker.begin_request()
                call = None
                try:
                    call = worker.stub.Generate(request, timeout=self.config.request_timeout)
                    async for chunk in call:
                        sent = True
                        if chunk.HasField("usage"):  # the last chunk: how far this request filled the context
                            measured = True
                            # The sequences share one pool: four of 1,000 tokens touch what one of 4,000 does.
                            pool = worker.pool()
                            worker.context_high = max(worker.context_high,
                                                      chunk.usage.prompt_tokens + chunk.usage.completion_tokens,
                                                      pool.cells_high if pool else 0)
                            chunk.usage.load_s = load_s
                        yield chunk
                    self._served(replica, worker)
                    completed = True
                    return
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    error, died = await self._failed(replica, worker, e)
                    if died and not sent and attempt == 1:
                        log.warning("request_retried", model=self.name, worker_pid=worker.pid, reason=error.message)
                        continue
                    raise error from None
                finally:
                    if call is not None:
                        call.cancel()  # a no-op when it completed; the worker frees the sequence next step
                    if not measured and worker.info is not None:
                        # Cancelled or failed before its usage came: it may have filled the context as far as
                        # n_ctx. Assume it did, so the leak rule does not take that growth for a leak.
                        worker.context_high = max(worker.context_high, worker.info.n_ctx)
                    if not completed and worker.alive:
                        unfinished = worker
                    else:
                        worker.end_request()
        finally:
            if unfinished is not None:
                # The client hears now; the place is given up once the worker has freed the sequence.
                replica.keep(self._release(replica, unfinished, request_id), f"release-{unfinished.pid}-{request_id}")
            else:
                self._leave(replica)

    async def embed(self, request: pb.EmbedRequest, keep_alive: float | None = None) -> pb.EmbedResponse:
        """Every input's vector, through the same queue, thermal gate and retry as `generate`. A call that
        ends early (cancelled, past request_timeout) gives its place up at once: the worker stops before its
        next input, and the request after it waits on the worker's one embedding thread meanwhile."""
        replica = self.pick()
        await self._enter_queue(replica, keep_alive)
        try:
            await self._until_cool(replica)
            for attempt in (1, 2):
                worker = await self._ready(replica)
                worker.begin_request()
                try:
                    response = await worker.stub.Embed(request, timeout=self.config.request_timeout)
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                    error, died = await self._failed(replica, worker, e)
                    if died and attempt == 1:  # a unary call: nothing reached the client
                        log.warning("request_retried", model=self.name, worker_pid=worker.pid, reason=error.message)
                        continue
                    raise error from None
                finally:
                    pool = worker.pool()  # its longest input so far: how far the compute buffers were touched
                    worker.context_high = max(worker.context_high, pool.cells_high if pool else 0)
                    worker.end_request()
                self._served(replica, worker)
                return response
        finally:
            self._leave(replica)

    async def warm(self) -> None:
        """A worker ready on every replica, as Ollama's empty request asks; keep_alive counts from now."""
        await asyncio.gather(*(self._ready(replica) for replica in self.replicas))
        for replica in self.replicas:
            replica.used()

    async def _ready(self, replica: Replica) -> WorkerProcess:
        """The replica's serving worker, started for this request if need be. A start that fails to load
        is the model being unavailable to the request (UNAVAILABLE, HTTP 503), not the request being
        wrong, whatever code the load's own caller (LoadModel) gets for it."""
        try:
            return await replica.ready_worker()
        except ApiError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise unavailable(f"model {self.name!r} cannot start: {e.message}") from None
            raise

    async def _until_cool(self, replica: Replica) -> None:
        if not replica.thermal.cool.is_set():  # a GPU past temperature_throttle: wait here, first in line
            await replica.queue.counted(replica.thermal.wait("not admitting requests", self.config.request_timeout))

    def _served(self, replica: Replica, worker: WorkerProcess) -> None:
        worker.requests_served += 1
        try:
            replica.watchdog.after_request(worker)
        except Exception:  # the watchdog's trouble must never fail a request that succeeded
            log.exception("after_request_failed", model=self.name)

    async def _failed(self, replica: Replica, worker: WorkerProcess,
                      e: grpc.aio.AioRpcError | asyncio.CancelledError) -> tuple[ApiError, bool]:
        """A call to the worker raised `e`: our own cancellation goes on up; anything else is explained."""
        if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
            raise e  # our own client went away
        # A CancelledError we did not ask for means the call's channel closed: the worker is gone.
        return await self._explain(replica, worker, e if isinstance(e, grpc.aio.AioRpcError) else None)

    @staticmethod
    def _leave(replica: Replica) -> None:
        replica.used()  # before the place is free: keep_alive never sees it idle with an old clock
        replica.queue.leave()
        replica.watchdog.unload_if_idle()  # keep_alive 0: right after the request, now that it is done

    async def _release(self, replica: Replica, worker: WorkerProcess, request_id: int, leave: bool = True) -> None:
        """Until the worker has freed an unfinished request's sequence (a step, usually), then its place in
        the queue goes to the next request: the worker never holds more than `parallel` sequences, and
        keep_alive and eviction never see it idle while it still computes. A worker hung in a C call never
        answers: the heartbeat rule replaces it meanwhile, since the request still counts as in flight."""
        try:
            await worker.stub.Released(worker_pb2.ReleasedRequest(request_id=request_id),
                                       timeout=replica.config.heartbeat_timeout + RELEASE_MARGIN_S)
        except grpc.aio.AioRpcError:
            pass  # gone, or hung past the heartbeat: what its exit says is told elsewhere
        finally:
            worker.end_request()
            if leave:
                self._leave(replica)

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        replica = self.pick()
        worker = await self._ready(replica)
        try:
            return await worker.stub.Tokenize(request, timeout=TOKENIZE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # slow, perhaps busy: no reason to replace it
                raise ApiError(e.code(), f"model {self.name!r}: tokenizing took longer than "
                                         f"{TOKENIZE_TIMEOUT_S:g} s") from None
            raise (await self._explain(replica, worker, e))[0] from None

    async def _explain(self, replica: Replica, worker: WorkerProcess,
                       e: grpc.aio.AioRpcError | None) -> tuple[ApiError, bool]:
        """Turn a failed worker call into what the client should read, and whether the worker died."""
        code = e.code() if e is not None else grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Only this request ends: the worker frees its sequence at the next step and serves the others on.
            # A worker hung in a C call stops beating its heartbeat, and that rule replaces it.
            return ApiError(code, f"model {self.name!r}: request ran past request_timeout "
                                  f"({self.config.request_timeout:g} s); the worker frees its sequence and "
                                  f"serves on"), False
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
        if replica.state == ReplicaState.CLOSED:  # unloaded or shut down, this request unfinished at the drain's end
            return unavailable(f"model {self.name!r} {replica.reason}; the request did not finish "
                               f"in time (worker pid {worker.pid}: {reason})"), False
        return unavailable(f"model {self.name!r}: worker pid {worker.pid} died mid-request: {reason}"), True
