"""Worker processes: spawn one under limits, wait until it serves, watch its exit, stop it.

The manager acts; it decides nothing. Who to start or stop is the model runtime's call.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import structlog

from llm_supervisor.v1 import worker_pb2, worker_pb2_grpc

from worker.heartbeat import read_pool
from worker.main import LISTENING

from supervisor.settings.config import ModelConfig
from supervisor.errors import precondition
from supervisor.observe.events import EventBus
from supervisor.process.readlines import read_lines
from supervisor.observe.monitor import WorkerHistory
from supervisor.process.output import OutputLog
from supervisor.decide.policies import Limits
from supervisor.process.standby import spawn_worker_process
from supervisor.process.states import ALLOWED, ALIVE_STATES, WorkerState, describe_exit, hopeless

log = structlog.get_logger("llm_supervisor.manager")

STDERR_TAIL_LINES = 50
# The largest reply taken from a worker: an Embed of 2,048 inputs (validation.MAX_EMBED_INPUTS) of 4,096
# dimensions is 32 MiB, past gRPC's default 4 MiB.
WORKER_REPLY_LIMIT = 128 << 20
# Words by which llama.cpp's log lines name a failure (for load-failure messages), and those worth a
# warning in the supervisor's log (llama.cpp says hundreds of routine lines at load).
FAILURE_WORDS = ("fail", "error", "insufficient")
LOUD_WORDS = (*FAILURE_WORDS, "warn")


def mentions(line: str, words: tuple[str, ...]) -> bool:
    lowered = line.lower()
    return any(w in lowered for w in words)


@dataclass(frozen=True)
class Spawn:
    """Everything needed to start one worker of a model."""

    model: ModelConfig
    model_path: Path
    socket_path: Path
    rlimit_data: int | None = None  # the worker's RLIMIT_DATA: configured or derived (memory_lines.py)


@dataclass(frozen=True)
class Pool:
    """A worker's batch: `parallel` sequences sharing one KV pool of n_ctx cells."""

    parallel: int
    active: int
    cells: int
    n_ctx: int
    cached: int
    preemptions: int
    cells_high: int  # the most cells in use at once: how far its compute buffers have been touched


class WorkerProcess:
    def __init__(self, spawn: Spawn, events: EventBus, output: OutputLog | None = None, clock=time.monotonic) -> None:
        self.spawn = spawn
        self.events = events
        self.output = output
        self.name = spawn.model.name
        self.state = WorkerState.STARTING
        self.pid = 0
        self.started_at = clock()
        self.ready_at: float | None = None  # when it began to take requests (time.monotonic), set by its replica
        self.requests_served = 0
        self.exit_reason = ""
        self.returncode: int | None = None  # once it has exited: negative for a signal
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.info: worker_pb2.WorkerInfo | None = None
        self._clock = clock
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None
        self.stub: worker_pb2_grpc.WorkerStub | None = None
        self.exited = asyncio.Event()
        self.listening = asyncio.Event()  # its socket takes connections
        self.stop_requested = False
        self.heartbeat_path = spawn.socket_path.with_suffix(".beat")
        self.in_flight = 0  # requests (sequences) it is running
        self._request_ids = itertools.count(1)
        self.busy_since = 0.0  # monotonic time it went from no request in flight to one
        self.context_high = 0  # the most KV cells in use at once: one request's, or all its sequences' together
        self.idle = asyncio.Event()  # set while no request is in flight on it
        self.idle.set()
        self.kill_reason = ""  # set when the supervisor kills it on purpose (a hard line, a hang)
        self.kill_kind = ""  # which rule killed it: "memory", "hung", "timeout", "by_hand"
        self.watch = WorkerHistory()  # the watchdog's samples of this worker; baseline set once it serves
        self.limits = Limits()  # its own limits: max_requests carries the jitter drawn for it
        self._tasks: list[asyncio.Task] = []
        self.on_exit: Callable[[WorkerProcess], None] | None = None  # the model's, once it serves

    # -- state ---------------------------------------------------------------------------------------
    def change_state(self, new: WorkerState, reason: str = "") -> None:
        if new == self.state:
            return
        if new not in ALLOWED[self.state]:
            raise RuntimeError(f"worker {self.name} pid {self.pid}: {self.state.value} → {new.value} is not allowed")
        # READY ⇄ BUSY happens twice a request: worth a debug line, not an info one.
        routine = {self.state, new} == {WorkerState.READY, WorkerState.BUSY}
        self.events.emit("worker_state", self.name, "debug" if routine else "info", self.pid, reason,
                         state=new.value, old=self.state.value, new=new.value)
        self.state = new

    def new_request_id(self) -> int:
        return next(self._request_ids)

    def begin_request(self) -> None:
        """A request goes to it: BUSY while any runs (it generates up to `parallel` at once), and its
        progress is measured from the first. A worker that died meanwhile is left as it is: the call to it
        then says how it ended."""
        self.in_flight += 1
        if self.in_flight == 1:
            self.busy_since = self._clock()
        if self.state == WorkerState.READY:
            self.change_state(WorkerState.BUSY, "request")
        self.idle.clear()

    def end_request(self) -> None:
        self.in_flight -= 1
        if self.in_flight:
            return
        self.idle.set()
        if self.state == WorkerState.BUSY:
            self.change_state(WorkerState.READY, "request done")

    def pool(self) -> Pool | None:
        """Its batch as of its last step (read from its heartbeat file), or None before it has served."""
        figures = read_pool(str(self.heartbeat_path))
        if figures is None or self.info is None:
            return None
        active, cells, cached, preemptions, cells_high = figures
        return Pool(self.info.parallel or 1, active, cells, self.info.n_ctx, cached, preemptions, cells_high)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    def uptime(self) -> float:
        return self._clock() - self.started_at

    # -- start ---------------------------------------------------------------------------------------
    def arguments(self) -> list[str]:
        """The worker's command line after `python -m worker.main`; a spare gets it as JSON on stdin."""
        m = self.spawn.model
        return [
            "--name", m.name,
            "--model", str(self.spawn.model_path),
            "--socket", str(self.spawn.socket_path),
            "--engine", m.engine,
            "--options", json.dumps(m.worker_options()),
            "--parent-pid", str(os.getpid()),
            "--rlimit-data", str(self.spawn.rlimit_data or 0),
            "--rlimit-nofile", str(m.rlimit_nofile),
            "--stream-interval", str(m.stream_interval),
            "--heartbeat", str(self.heartbeat_path),
        ]

    async def start(self, spare: asyncio.subprocess.Process | None = None) -> None:
        """Spawn (or turn `spare`, a standby process, into this worker) and wait until it answers;
        raises ApiError with the worker's own reason."""
        self.spawn.socket_path.unlink(missing_ok=True)
        self._proc = await self._adopt(spare) if spare is not None else None
        if self._proc is None:
            self._proc = await spawn_worker_process(self.arguments(), stdin=asyncio.subprocess.DEVNULL)
        self.pid = self._proc.pid
        log.info("worker_spawned", model=self.name, worker_pid=self.pid, path=str(self.spawn.model_path),
                 standby=spare is not None and self._proc is spare)
        self._tasks.append(asyncio.create_task(self._read_output(), name=f"output-{self.pid}"))
        self._tasks.append(asyncio.create_task(self._watch_exit(), name=f"exit-{self.pid}"))
        # The model loads before the worker's socket exists; the worker says when it listens.
        await self._while_alive(asyncio.wait_for(self.listening.wait(), self.spawn.model.load_timeout))
        self._channel = grpc.aio.insecure_channel(f"unix://{self.spawn.socket_path}",
                                                  options=[("grpc.max_receive_message_length", WORKER_REPLY_LIMIT)])
        self.stub = worker_pb2_grpc.WorkerStub(self._channel)
        self.info = await self._while_alive(
            self.stub.Info(worker_pb2.WorkerInfoRequest(), wait_for_ready=True, timeout=self.spawn.model.load_timeout))

    async def warm_up(self) -> None:
        """The warm-up pass (see worker.proto), then READY: its memory baseline can be taken now."""
        self.info = await self._while_alive(
            self.stub.WarmUp(worker_pb2.WarmUpRequest(), timeout=self.spawn.model.load_timeout))
        self.change_state(WorkerState.READY, "loaded")

    async def _while_alive(self, waited):
        """What `waited` (a call or a wait made while the worker starts) gives, or ApiError saying why
        nothing came: the worker died (with its own last words), refused, or took longer than load_timeout
        (then it is stopped)."""
        async def answer_of():
            return await waited

        answer = asyncio.create_task(answer_of())
        died = asyncio.create_task(self.exited.wait())
        try:
            done, _ = await asyncio.wait({answer, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if answer in done and answer.exception() is None:
            return answer.result()
        answer.cancel()
        if self.exited.is_set():
            await asyncio.gather(*self._tasks, return_exceptions=True)
            raise precondition(f"model {self.name!r}: worker failed to load: {self.failure_summary()}")
        error = answer.exception() if answer in done else None
        await self.stop(grace=1.0)
        if isinstance(error, grpc.aio.AioRpcError) and error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise precondition(error.details() or str(error.code()))
        raise precondition(f"model {self.name!r}: worker did not become ready within load_timeout "
                           f"({self.spawn.model.load_timeout:g} s)")

    async def _adopt(self, spare: asyncio.subprocess.Process) -> asyncio.subprocess.Process | None:
        """Hand a spare its arguments; None if it died meanwhile (then a fresh process is spawned)."""
        assert spare.stdin is not None
        try:
            spare.stdin.write((json.dumps(self.arguments()) + "\n").encode())
            await spare.stdin.drain()
            spare.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            return None
        return spare

    def failure_summary(self) -> str:
        """The worker's own last word (it prints 'error: …' before exiting), llama.cpp's reason, and how it ended."""
        said = [line for line in self.stderr_tail if line.startswith("error:")]
        detail = said[-1][len("error:"):].strip() if said else ""
        causes = [line for line in self.stderr_tail
                  if not line.startswith("error:") and mentions(line, FAILURE_WORDS)]
        if causes:
            detail = f"{detail} — llama.cpp: {causes[-1]}" if detail else causes[-1]
        ended = f"{detail} ({self.exit_reason})" if detail else self.exit_reason
        advice = hopeless(self.returncode, self.name)
        return f"{ended}: {advice}" if advice else ended

    async def _read_output(self) -> None:
        assert self._proc and self._proc.stdout
        async for line in read_lines(self._proc.stdout):
            line = line.rstrip()
            if line == LISTENING:
                self.listening.set()
            elif line:
                self.stderr_tail.append(line)
                if self.output is not None:
                    self.output.append(self.pid, line)
                (log.warning if mentions(line, LOUD_WORDS) else log.debug)("worker_output", model=self.name, worker_pid=self.pid, line=line)

    async def _watch_exit(self) -> None:
        assert self._proc
        code = self.returncode = await self._proc.wait()
        self.exit_reason = describe_exit(code)
        if self.kill_reason:
            self.exit_reason = f"killed by the supervisor: {self.kill_reason}"
        self.events.emit("worker_exited", self.name, "info" if self.state == WorkerState.STOPPING else "warning",
                         self.pid, self.exit_reason, state=WorkerState.EXITED.value, was=self.state.value)
        self.state = WorkerState.EXITED  # any state may end here: the process is gone whatever we thought
        # Its socket and heartbeat file go with it, however it ended: a crash leaves no one else to remove them.
        self.spawn.socket_path.unlink(missing_ok=True)
        self.heartbeat_path.unlink(missing_ok=True)
        if self.on_exit is not None:
            try:
                self.on_exit(self)  # before those waiting for the exit wake: they find it handled
            except Exception:
                log.exception("exit_handler_failed", model=self.name, worker_pid=self.pid)
        self.exited.set()
        # The channel stays open: closing it would turn the calls still reading from it into
        # asyncio.CancelledError, indistinguishable from a client's cancel. They fail UNAVAILABLE on their own.

    async def close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- stop ----------------------------------------------------------------------------------------
    async def stop(self, grace: float = 5.0) -> None:
        """Asked-for exit: TERM, wait `grace` seconds, then KILL the whole process group."""
        self.stop_requested = True
        if self._proc is not None and not self.exited.is_set():
            if self.state != WorkerState.STOPPING:
                self.change_state(WorkerState.STOPPING, "stop requested")
            await self.terminate(grace)
        self.spawn.socket_path.unlink(missing_ok=True)
        self.heartbeat_path.unlink(missing_ok=True)
        await self.close_channel()

    async def terminate(self, grace: float) -> None:
        """TERM, then KILL after `grace`: the gap is never zero (gunicorn #2454), and KILL also ends a
        worker that is stopped or stuck in a C call, which TERM cannot."""
        self._signal(signal.SIGTERM)
        if not await self.wait_exit(grace):
            log.warning("worker_kill", model=self.name, worker_pid=self.pid, reason=f"no exit {grace:g} s after SIGTERM")
            self._signal(signal.SIGKILL)
            await self.wait_exit(5.0)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
