"""The workers of one model over time: start, crash and back-off, watchdog decisions, recycle.

Level-triggered from the monitor loop (`tick`, each poll interval) and after each request
(`after_request`); edge-triggered on a worker's exit (`_supervise`). Decisions come from
supervisor/policies.py; this only carries them out, one at a time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import time
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from worker.heartbeat import read_beat

from .config import ModelConfig
from .errors import ApiError, unavailable
from .estimate import Estimate, estimate
from .events import EventBus
from .gguf_file import GGUFInfo
from .manager import Spawn, WorkerProcess
from .memory_lines import MemoryLines, memory_lines
from .monitor import Monitor, WorkerHistory
from .output import OutputLog
from .gpu import GpuSnapshot
from .policies import (Action, Decision, Heat, Limits, Thermal, Usage, decide, draw_max_requests,
                       hung_for, keep_alive_expired, restart_delay, unload_in)
from .standby import StandbyPool
from .thermal import ThermalGate
from .tasks import Background
from .states import SERVING_STATES, WorkerState, hopeless

log = structlog.get_logger("llm_supervisor.lifecycle")

# A worker that dies sooner than this after it started counts as a fast failure (supervisord's startsecs).
FAST_FAILURE_S = 10.0
# Between SIGTERM and SIGKILL for a worker that is hung or past its request_timeout.
KILL_GRACE_S = 2.0


async def quiet(worker: WorkerProcess) -> None:
    """Until `worker` has no request in flight (or has exited)."""
    idle = asyncio.create_task(worker.idle.wait())
    exited = asyncio.create_task(worker.exited.wait())
    await asyncio.wait({idle, exited}, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    exited.cancel()


def memory_figures(worker: WorkerProcess) -> dict[str, int]:
    """The worker's latest memory figures, for the record of a decision about it."""
    if not worker.watch.periodic:
        return {}
    latest = worker.watch.periodic[-1]
    figures = {"private_memory_bytes": latest.private, "file_rss_bytes": latest.file_rss}
    if latest.gpu is not None:
        figures["gpu_memory_bytes"] = latest.gpu
    return figures


def limits_for(config: ModelConfig, lines: MemoryLines, rng: random.Random) -> Limits:
    return Limits(
        max_private_memory=lines.max_private_memory,
        max_gpu_memory=lines.max_gpu_memory,
        leak_threshold=lines.leak_threshold,
        hard_factor=config.hard_memory_factor,
        rlimit_data=lines.rlimit_data,
        max_requests=draw_max_requests(config.max_requests, config.max_requests_jitter, rng),
        context_growth=lines.context_growth,
        warm_context=lines.warm_context,
    )


class Lifecycle:
    def __init__(self, config: ModelConfig, gguf: GGUFInfo, socket_dir: Path, monitor: Monitor, events: EventBus,
                 on_change: Callable[[], None] = lambda: None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, standby: StandbyPool | None = None,
                 room: Callable[[Usage], tuple[bool, str]] = lambda needed: (True, ""),
                 admit: Callable[["Lifecycle"], Awaitable[None]] | None = None, replica: int = 0,
                 output: OutputLog | None = None) -> None:
        self.config = config
        self.events = events
        self.gguf = gguf
        self.monitor = monitor
        self.worker: WorkerProcess | None = None
        self.slot = asyncio.Lock()  # one request at a time on the worker; FIFO for waiters
        self.restarts = 0
        self.recycles = 0
        self.recycles_by_kind: collections.Counter[str] = collections.Counter()  # by rule, for metrics
        self.last_exit = ""
        self.last_recycle_reason = ""
        self.last_recycle_at: float | None = None
        self.fatal_reason = ""
        self.stopped_reason = ""  # stopped by hand (llmctl stop): no worker starts until llmctl start
        self.closed = False
        self.closed_reason = "is being unloaded"  # completes "model 'x' …" in what requests are told
        self.replica = replica  # which of the model's `replicas` this is, from 0
        self.output = output or OutputLog()  # its workers' output lines, for llmctl tail (shared by the replicas)
        self.memory_note = ""  # set at admission: e.g. weights larger than the free RAM, read from the file
        self._retiring: set[WorkerProcess] = set()  # draining after a recycle, no longer self.worker
        self.waiting = 0  # requests queued for the slot
        self.keep_alive = config.keep_alive  # a request may change it for the model, as in Ollama
        self.last_used = clock()
        self._fast_failures = 0
        self._socket_dir = socket_dir
        self._serial = itertools.count(1)
        self._starting: asyncio.Task[WorkerProcess] | None = None
        self._launching: WorkerProcess | None = None  # the worker being started, not serving yet
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._clock = clock
        self._standby = standby
        self._room = room  # whether the memory budgets hold a replacement beside the workers running now
        self._admit = admit  # before any worker starts: make room, or refuse with RESOURCE_EXHAUSTED
        self._background = Background()
        self.thermal = ThermalGate(config.name)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def label(self) -> str:
        """The model's name, with the replica's number when it has several: "qwen", "qwen#2"."""
        return f"{self.name}#{self.replica + 1}" if self.config.replicas > 1 or self.replica else self.name

    @property
    def estimate(self) -> Estimate:
        """What one worker with these settings comes to hold (supervisor/estimate.py)."""
        return estimate(self.gguf.shape, self.config)

    @property
    def lines(self) -> MemoryLines:
        """The memory lines its workers run under: configured, or derived from the estimate."""
        return memory_lines(self.config, self.estimate)

    def _sample(self, worker: WorkerProcess, gpus: GpuSnapshot | None = None):
        return self.monitor.sample(worker.pid, worker.requests_served, gpus, context=worker.context_high)

    @property
    def load(self) -> int:
        """Requests on it: the one running, and those queued for it."""
        return int(self.slot.locked()) + self.waiting

    @property
    def state(self) -> str:
        if self.fatal_reason:
            return WorkerState.FATAL.value
        if self.stopped_reason and (self.worker is None or not self.worker.alive):
            return WorkerState.STOPPED.value
        return self.worker.state.value if self.worker else WorkerState.EXITED.value

    @property
    def gpu_temperature(self) -> int | None:
        return self.thermal.hottest

    @property
    def throttle_reason(self) -> str:
        return self.thermal.reason

    @property
    def serving(self) -> bool:
        return self.worker is not None and self.worker.state in SERVING_STATES

    @property
    def accepting(self) -> bool:
        """Takes requests: a worker serves, or one will start for them (a recycle's replacement, a start on
        demand after keep_alive); not FATAL, STOPPED, too hot or unloaded."""
        return not (self.closed or self.stopped_reason or self.fatal_reason) and self.thermal.cool.is_set()

    @property
    def holds_memory(self) -> bool:
        """A worker of this model is running, draining or loading (admitted: it counts against the budgets)."""
        return self._launching is not None or any(w is not None and w.alive for w in (self.worker, *self._retiring))

    @property
    def idle(self) -> bool:
        """No request running or queued: evicting it now costs nobody a wait."""
        return (self.worker is not None and self.worker.state == WorkerState.READY and not self.waiting
                and not self.slot.locked())

    # -- start -----------------------------------------------------------------------------------------
    def start_task(self, warm_after: WorkerProcess | None = None) -> asyncio.Task[WorkerProcess]:
        """The start in progress, or a new one: there is never more than one. With `warm_after`, the new
        worker loads now but runs its warm-up pass only once that (draining) worker is idle: two processes
        computing on the same cores slow each other several times over (OpenMP threads spin-wait)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._spawn(warm_after=warm_after))
        return self._starting

    async def start(self) -> WorkerProcess:
        """Start a worker (or join the start in progress). Raises ApiError when it cannot load."""
        return await asyncio.shield(self.start_task())

    async def _launch(self, warm_after: WorkerProcess | None) -> WorkerProcess:
        socket_path = self._socket_dir / f"{self.name}.{self.replica}.{next(self._serial)}.sock"
        worker = WorkerProcess(Spawn(self.config, self.gguf.path, socket_path, self.lines.rlimit_data),
                               self.events, self.output)
        self._launching = worker
        try:
            await worker.start(self._standby.take() if self._standby else None)
            if warm_after is not None:
                await quiet(warm_after)
            if self.closed:
                await worker.stop()
                raise unavailable(f"model {self.name!r} {self.closed_reason}")
            await worker.warm_up()
        finally:
            self._launching = None
            if self._standby:
                self._standby.refill()  # now, not earlier: its imports would have slowed this start
        return worker

    async def _spawn(self, after: float = 0.0, warm_after: WorkerProcess | None = None) -> WorkerProcess:
        if after:
            await asyncio.sleep(after)
        if self.closed:
            raise unavailable(f"model {self.name!r} {self.closed_reason}")
        try:
            # Every start comes this way — a request's, a restart's, a recycle's, Tokenize's, llmctl start's:
            # none loads a worker onto a GPU that is still past its temperature line.
            await self.thermal.wait("not starting a worker", self.config.request_timeout)
            if self._admit is not None:
                await self._admit(self)
        except ApiError as e:  # too hot or no room now: the next request tries again, the model is not FATAL
            self.last_exit = e.message
            self._on_change()
            raise
        self.fatal_reason = ""
        try:
            worker = await self._launch(warm_after)
        except ApiError as e:
            self.fatal_reason = e.message
            self._on_change()
            raise
        self._install(worker)
        return worker

    def _install(self, worker: WorkerProcess) -> None:
        """Make `worker` the one requests go to. Its baseline is taken now, after the warm-up it ran at load."""
        # The previous worker's channel is left to the garbage collector: closing it while a request
        # may still be reading its last call would cancel that call under the request's feet.
        self.worker = worker
        self.last_used = self._clock()
        worker.context_high = self.lines.warm_context  # its warm-up filled one n_batch
        worker.watch = WorkerHistory(baseline=self._sample(worker))
        worker.limits = limits_for(self.config, self.lines, self._rng)
        worker.on_exit = self._exited
        self._on_change()
        if worker.exited.is_set():  # it died between its warm-up and now
            self._exited(worker)

    async def ready_worker(self) -> WorkerProcess:
        """The serving worker, started if there is none. BUSY counts as serving: callers that do not hold
        the slot (Tokenize, a recycle by hand) must not take a busy worker for a missing one."""
        worker = self.worker
        if worker is not None and worker.state in SERVING_STATES:
            return worker
        if self.closed:
            raise unavailable(f"model {self.name!r} {self.closed_reason}")
        if self.stopped_reason:
            raise unavailable(f"model {self.name!r} is STOPPED: {self.stopped_reason}; "
                              f"`llmctl start {self.name}` starts it again")
        if self.fatal_reason and (self._starting is None or self._starting.done()):
            raise unavailable(f"model {self.name!r} is FATAL: {self.fatal_reason}; load it again to retry")
        if self._starting is not None and not self._starting.done():
            return await asyncio.shield(self._starting)
        return await self.start()

    # -- exits -----------------------------------------------------------------------------------------
    def _exited(self, worker: WorkerProcess) -> None:
        """Edge-triggered on a worker's exit, before anything waiting for that exit wakes (supervisord's
        finish()): a request about to retry then finds the restart, or the FATAL verdict, already decided
        — never a dead worker it would start a second replacement for. One nobody asked for is a crash,
        restarted with back-off."""
        self.last_exit = worker.exit_reason
        self._on_change()
        if self.closed or worker.stop_requested or worker is not self.worker:
            return
        if worker.kill_reason:  # the watchdog's hard line: a recycle, not a crash
            self._restart()
            return
        self.restarts += 1
        advice = hopeless(worker.returncode, self.name)
        if advice:  # the same death on every restart: FATAL at once, saying what to do
            self.fatal_reason = f"its worker was {worker.exit_reason}: {advice}"
            self.events.emit("worker_crashed", self.name, "error", worker.pid, worker.exit_reason, restarts=self.restarts)
            self.events.emit("model_fatal", self.name, "error", worker.pid, self.fatal_reason, state="FATAL")
            self._on_change()
            return
        fast = worker.uptime() < FAST_FAILURE_S
        self._fast_failures = self._fast_failures + 1 if fast else 1
        self.events.emit("worker_crashed", self.name, "warning", worker.pid, worker.exit_reason,
                         restarts=self.restarts, fast_failures=self._fast_failures)
        if self._fast_failures > self.config.max_restarts:
            self.fatal_reason = (f"its worker died {self._fast_failures} times in a row within {FAST_FAILURE_S:g} s "
                                 f"of starting (max_restarts = {self.config.max_restarts}); last: {worker.exit_reason}")
            self.events.emit("model_fatal", self.name, "error", worker.pid, self.fatal_reason, state="FATAL")
            self._on_change()
            return
        delay = restart_delay(self._fast_failures - 1)
        if delay:
            worker.change_state(WorkerState.BACKOFF, f"restart in {delay:g} s")
        self._restart(delay)

    def _restart(self, delay: float = 0.0) -> None:
        """Start a worker after `delay` (requests arriving meanwhile wait for this start instead of starting
        their own), or join the start in progress; a failure is logged (the model is FATAL then)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._spawn(after=delay))
        self._background.keep(self._report_restart(self._starting), f"restart-{self.label}")

    async def _report_restart(self, start: asyncio.Task[WorkerProcess]) -> None:
        try:
            await asyncio.shield(start)
        except ApiError as e:
            log.error("worker_restart_failed", model=self.name, reason=e.message)

    # -- watchdog --------------------------------------------------------------------------------------
    def tick(self, gpus: GpuSnapshot | None) -> None:
        """Each poll interval: measure the workers and act on what the policies say. A draining worker
        is still watched: its last request must not cross the hard line either."""
        if gpus is not None:
            self._check_heat(gpus)
        watched = SERVING_STATES | {WorkerState.DRAINING}
        for worker in [self.worker, *self._retiring]:
            if worker is None or worker.state not in watched:
                continue
            sample = self._sample(worker, gpus)
            if sample is not None:
                worker.watch.periodic.append(sample)
                baseline = worker.watch.baseline
                if baseline is not None and baseline.gpu is None and sample.gpu is not None:
                    # NVML lists a process a poll after it allocates: its first GPU figure is its baseline.
                    worker.watch.baseline = dataclasses.replace(baseline, gpu=sample.gpu)
                self._act(worker, self._decide(worker))
            self._check_progress(worker)
        self._unload_if_idle()

    def _check_heat(self, gpus: GpuSnapshot) -> None:
        """temperature_throttle closes the door to new requests and worker starts; temperature_critical
        also drains and unloads the worker. Both hold until the GPU is `temperature_hysteresis` below."""
        worker = self.worker
        pid = worker.pid if worker is not None else 0
        c = self.config
        rose, cooled = self.thermal.update(
            gpus, gpus.devices_of(worker.pid) if worker is not None and worker.alive else set(),
            Thermal(c.temperature_throttle, c.temperature_critical, c.temperature_hysteresis))
        for hot in rose:
            critical = hot.level == Heat.CRITICAL
            self.events.emit("gpu_critical" if critical else "gpu_throttle", self.name,
                             "error" if critical else "warning", pid, hot.reason, gpu=hot.gpu,
                             temperature_c=hot.temperature)
            if critical and worker is not None and worker.state in SERVING_STATES:
                self._retire_later(worker, hot.reason, replacement=None)
        if cooled:
            self.events.emit("gpu_cool", self.name, "info", pid, cooled)
        if rose or cooled:
            self._on_change()

    async def admitted(self) -> None:
        """Returns once the model's GPUs are cool enough to take a request; UNAVAILABLE after
        request_timeout of waiting, with the temperature that keeps the door shut."""
        if self.thermal.cool.is_set():
            return
        self.waiting += 1  # queued, as far as anyone looking at the queue can tell
        try:
            await self.thermal.wait("not admitting requests", self.config.request_timeout)
        finally:
            self.waiting -= 1

    def _check_progress(self, worker: WorkerProcess) -> None:
        """A busy worker must prove progress: a hung C call keeps the process and its threads alive."""
        if worker.idle.is_set() or not worker.alive or worker.kill_reason:
            return
        silent = hung_for(read_beat(str(worker.heartbeat_path)), worker.busy_since, self._clock(),
                          self.config.heartbeat_timeout)
        if silent is not None:
            self.recycle_now(worker, f"no progress for {silent:.1f} s (heartbeat_timeout "
                                     f"{self.config.heartbeat_timeout:g} s): hung", grace=KILL_GRACE_S, kind="hung")

    def after_request(self, worker: WorkerProcess) -> Decision:
        """After each request: a per-request sample, so a leak shows as a trend per request."""
        self.used()
        sample = self._sample(worker)
        if sample is None:
            return Decision(Action.NONE)
        worker.watch.per_request.append(sample)
        worker.watch.periodic.append(sample)
        decision = self._act(worker, self._decide(worker))
        self._unload_if_idle()  # keep_alive 0: right after the request
        return decision

    def used(self) -> None:
        """A request ended (well or not): keep_alive counts from now."""
        self.last_used = self._clock()

    def unload_in(self) -> float:
        return unload_in(self.last_used, self._clock(), self.keep_alive)

    def _unload_if_idle(self) -> None:
        worker = self.worker
        if worker is None or worker.state not in SERVING_STATES:
            return
        if keep_alive_expired(self.last_used, self._clock(), self.keep_alive, self.load):
            reason = f"idle for keep_alive ({self.keep_alive:g} s)"
            self.events.emit("worker_idle_unload", self.name, "info", worker.pid, reason)
            self._retire_later(worker, reason, replacement=None)

    @staticmethod
    def _decide(worker: WorkerProcess) -> Decision:
        watch = worker.watch
        return decide(watch.periodic, watch.per_request, watch.baseline, worker.limits)

    def _act(self, worker: WorkerProcess, decision: Decision) -> Decision:
        if decision.action == Action.KILL:
            self.recycle_now(worker, decision.reason, kind=decision.rule)
        elif decision.action == Action.RECYCLE and worker.state in SERVING_STATES:
            self.begin_recycle(worker, decision.reason, decision.figures, kind=decision.rule)
        return decision

    def recycle_now(self, worker: WorkerProcess, reason: str, grace: float = 0.0, kind: str = "other") -> None:
        """Hard: end it now — SIGKILL, or TERM and KILL after `grace`. The request in flight fails with
        this reason; a fresh worker starts (unless it was draining: its replacement is already coming)."""
        if worker.kill_reason or not worker.alive:
            return
        if worker.state != WorkerState.DRAINING:  # a draining worker's recycle is already counted
            self.recycles += 1
            self.recycles_by_kind[kind] += 1
            self.last_recycle_reason = reason
            self.last_recycle_at = self._clock()
        self.events.emit("worker_recycle", self.name, "warning", worker.pid, reason, graceful=False, **memory_figures(worker))
        self._on_change()
        worker.kill_reason = reason
        worker.change_state(WorkerState.STOPPING, reason)  # no request goes to it any more
        if grace > 0:
            asyncio.create_task(worker.terminate(grace), name=f"terminate-{worker.pid}")
        else:
            worker.kill()

    def usage(self) -> Usage:
        """What this model's live workers hold now, by their latest samples."""
        latest = [w.watch.periodic[-1] for w in (self.worker, *self._retiring)
                  if w is not None and w.alive and w.watch.periodic]
        return Usage(sum(s.private for s in latest), sum(s.gpu or 0 for s in latest))

    def begin_recycle(self, worker: WorkerProcess, reason: str, figures: dict | None = None,
                      kind: str = "other") -> asyncio.Task:
        """Graceful: the worker takes no new request and finishes the one it has, while its replacement
        starts — first, when the memory budgets hold both, else once the old one has gone. Requests
        arriving meanwhile wait in the queue for the replacement, so none fails.

        Synchronous up to the DRAINING mark, so two decisions in one tick cannot both start a recycle.
        """
        cost = self.estimate  # what the replacement may come to hold
        first, why = self._room(Usage(cost.private_peak, cost.gpu))
        self.events.emit("worker_recycle", self.name, "info", worker.pid, reason, graceful=True,
                         replacement="first" if first else f"after the old worker exits: {why}",
                         **{**memory_figures(worker), **(figures or {})})
        self.recycles += 1
        self.recycles_by_kind[kind] += 1
        self.last_recycle_reason = reason
        self.last_recycle_at = self._clock()
        self._on_change()
        if first:
            # ready_worker() waits on this start, not on the draining worker.
            return self._retire_later(worker, reason, replacement=self.start_task(warm_after=worker))
        retire = self._retire_later(worker, reason, replacement=None)
        self._starting = asyncio.create_task(self._spawn_after_exit(worker))
        return retire

    async def _spawn_after_exit(self, old: WorkerProcess) -> WorkerProcess:
        await old.exited.wait()
        return await self._spawn()

    def _retire_later(self, worker: WorkerProcess, reason: str,
                      replacement: asyncio.Task[WorkerProcess] | None) -> asyncio.Task:
        """DRAINING now (no new request goes to it); stopped once its request in flight has finished."""
        worker.stop_requested = True  # its exit is not a crash
        worker.change_state(WorkerState.DRAINING, reason)
        self._retiring.add(worker)
        return asyncio.create_task(self._retire(worker, reason, replacement), name=f"retire-{worker.pid}")

    async def _retire(self, old: WorkerProcess, reason: str,
                      replacement: asyncio.Task[WorkerProcess] | None) -> WorkerProcess | None:
        fresh = None
        if replacement is not None:
            try:
                fresh = await asyncio.shield(replacement)
            except ApiError as e:
                log.error("worker_recycle_failed", model=self.name, worker_pid=old.pid, error=e.message)
        await old.idle.wait()  # the request it had, if any, finishes on it
        await old.stop()
        self._retiring.discard(old)
        if fresh is None:
            self.last_exit = reason
            self._on_change()
        return fresh

    async def recycle(self, reason: str) -> WorkerProcess:
        """Recycle gracefully by hand; returns the replacement once it serves (the old one retires on)."""
        worker = await self.ready_worker()
        self.begin_recycle(worker, reason, kind="by_hand")
        return await self.start()

    def evict(self, reason: str) -> asyncio.Task | None:
        """Unload the worker to make room for another model (it starts again on its next request).
        DRAINING at once, before this returns: nothing can send it a request after admission chose it.
        Returns the retirement to await (None when no worker serves)."""
        worker = self.worker
        if worker is None or worker.state not in SERVING_STATES:
            return None
        self.events.emit("model_evicted", self.name, "info", worker.pid, reason, **memory_figures(worker))
        return self._retire_later(worker, reason, replacement=None)

    # -- by hand and by reload -------------------------------------------------------------------------
    async def stop_by_hand(self, reason: str) -> WorkerProcess | None:
        """llmctl stop: the worker finishes its request and exits; none starts until `start_by_hand`.
        Requests meanwhile get UNAVAILABLE saying so. Returns the worker stopped, if one ran."""
        self.stopped_reason = reason
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)  # a start in progress finishes first
        worker = self.worker
        if worker is None or worker.state not in SERVING_STATES:
            return None
        await self._retire_later(worker, reason, replacement=None)
        return worker

    async def start_by_hand(self) -> tuple[WorkerProcess, bool]:
        """llmctl start: a worker serving now (a FATAL model gets a fresh set of tries); (worker, whether
        one already ran)."""
        running = self.serving
        self.stopped_reason = ""
        if self.fatal_reason:
            self._fast_failures = 0
        return await self.ready_worker(), running

    async def reconfigure(self, config: ModelConfig, gguf: GGUFInfo, keys: tuple[str, ...], new_worker: bool) -> None:
        """New settings from a reloaded config. Those baked into the worker process take a graceful
        recycle (returns once the replacement serves); the rest apply to the running worker at once."""
        self.config, self.gguf = config, gguf
        self.keep_alive = config.keep_alive
        worker = self.worker
        if worker is not None and worker.alive:
            worker.limits = limits_for(config, self.lines, self._rng)
        if self.fatal_reason and not self.stopped_reason:  # perhaps what the change fixed
            self._fast_failures = 0
            await self.start()
        elif new_worker and worker is not None and worker.state in SERVING_STATES:
            self.begin_recycle(worker, f"config changed: {', '.join(keys)}", kind="config")
            await self.start()

    async def drain(self, timeout: float) -> bool:
        """Until every request queued or in flight has finished (True), or `timeout` has passed (False).
        The slot is FIFO: once this holds it, all that queued before have been served. It keeps the slot,
        so nothing else starts; `stop` lets go of it."""
        try:
            await asyncio.wait_for(self.slot.acquire(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, grace: float = 5.0, drain: float = 0.0, reason: str = "is being unloaded") -> None:
        """Stop for good: after `drain` seconds at most for the requests already queued or in flight;
        what is still running then fails with UNAVAILABLE and `reason` ("model 'x' <reason>")."""
        drained = drain > 0 and await self.drain(drain)
        self.closed_reason = reason
        self.closed = True
        # Draining workers too: an unload or shutdown must not leave them to finish on their own. They go
        # first, since a replacement's start may be waiting for them to be idle.
        # One still loading is stopped too: a shutdown must not wait out a load of minutes.
        workers = [w for w in (self.worker, *self._retiring, self._launching) if w is not None]
        await asyncio.gather(*(w.stop(grace) for w in workers))
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.worker is not None and self.worker not in workers:
            await self.worker.stop(grace)
        if drained:
            self.slot.release()  # a request that queued after the drain now learns the model is gone
        self.output.followers.close()
        self._on_change()
