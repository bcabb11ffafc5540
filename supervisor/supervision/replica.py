"""One replica of a model: its state, its worker over time, and the one road to a new worker.

Every worker starts through `ensure_worker` — a request finding none, a crash's restart, a recycle's
replacement, `llmctl start`, a reload, the reconciler — and every change of the replica's state goes
through `change_state`, checked against supervision/states.py. Edge-triggered on a worker's exit
(`_exited`); level-triggered by the watchdog's pass (`reconcile`, each poll interval). The watchdog
(supervision/watchdog.py) decides what to do about a worker, recycling (supervision/recycling.py)
replaces it, the thermal gate (supervision/thermal.py) keeps the GPU's door.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
import time
from pathlib import Path
from typing import Awaitable, Callable, Protocol, TypeVar

import grpc
import structlog

from supervisor.decide.estimate import Estimate, estimate
from supervisor.decide.memory_lines import MemoryLines, memory_lines
from supervisor.decide.policies import Limits, Usage, draw_max_requests, restart_delay, unload_in
from supervisor.errors import ApiError, unavailable
from supervisor.observe.events import EventBus
from supervisor.observe.gpu import GpuSnapshot
from supervisor.observe.monitor import Monitor, WorkerHistory
from supervisor.process.output import OutputLog
from supervisor.process.standby import StandbyPool
from supervisor.process.states import SERVING_STATES, WorkerState, hopeless
from supervisor.process.worker_process import Spawn, WorkerProcess
from supervisor.settings.config import ModelConfig
from supervisor.settings.gguf_file import GGUFInfo
from supervisor.supervision.recycling import Recycles, memory_figures
from supervisor.supervision.states import ALLOWED, REFUSING, WANTS_WORKER, ReplicaState
from supervisor.supervision.thermal import ThermalGate
from supervisor.supervision.watchdog import Watchdog
from supervisor.tasks import Background

log = structlog.get_logger("llm_supervisor.replica")
T = TypeVar("T")

# A worker that dies sooner than this after it started counts as a fast failure (supervisord's startsecs).
FAST_FAILURE_S = 10.0


class Load(Protocol):
    """What the replica reads of its request queue (serving/queue.py), which the runtime operates."""

    @property
    def load(self) -> int: ...

    def refresh(self) -> None: ...


class NoQueue:
    load = 0

    def refresh(self) -> None:
        pass


async def quiet(worker: WorkerProcess) -> None:
    """Until `worker` has no request in flight (or has exited)."""
    idle = asyncio.create_task(worker.idle.wait())
    exited = asyncio.create_task(worker.exited.wait())
    await asyncio.wait({idle, exited}, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    exited.cancel()


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


class Replica:
    def __init__(self, config: ModelConfig, gguf: GGUFInfo, socket_dir: Path, monitor: Monitor, events: EventBus,
                 on_change: Callable[[], None] = lambda: None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, standby: StandbyPool | None = None,
                 room: Callable[[Usage], tuple[bool, str]] = lambda needed: (True, ""),
                 admit: Callable[["Replica"], Awaitable[None]] | None = None, index: int = 0,
                 output: OutputLog | None = None, queue: Load = NoQueue()) -> None:
        self.config = config
        self.gguf = gguf
        self.events = events
        self.monitor = monitor
        self.index = index  # which of the model's `replicas` this is, from 0
        self.queue = queue
        self.output = output or OutputLog()  # its workers' output lines, for llmctl tail (shared by the replicas)
        self.state = ReplicaState.UNLOADED
        self.reason = ""  # why it is in its state: what FATAL, STOPPED and CLOSED tell requests
        self.closed_code = grpc.StatusCode.UNAVAILABLE  # what CLOSED tells them: a failed first load's own code
        # A first load that is all or nothing (LoadModel, a load on demand): a failed start closes the replica
        # in the same step, so no request queued on it starts another (a second admission, evictions).
        self.close_on_failure = False
        self.worker: WorkerProcess | None = None
        self.retiring: set[WorkerProcess] = set()  # draining after a recycle or an unload, no longer self.worker
        self.restarts = 0
        self.last_exit = ""
        self.memory_note = ""  # set at admission: e.g. weights larger than the free RAM, read from the file
        self.keep_alive = config.keep_alive  # each request may set it for the time after it, as in Ollama
        self.last_used = clock()
        self.thermal = ThermalGate(config.name)
        self.recycles = Recycles(self, room, clock)
        self.watchdog = Watchdog(self, clock)
        self.rng = rng or random.Random()
        self._fast_failures = 0
        self._socket_dir = socket_dir
        self._serial = itertools.count(1)
        self._starting: asyncio.Task[WorkerProcess] | None = None  # the start in progress; never two
        self._launching: WorkerProcess | None = None  # the worker being started, not serving yet
        self._on_change = on_change
        self._clock = clock
        self._standby = standby
        self._admit = admit  # before any worker starts: make room, or refuse with RESOURCE_EXHAUSTED
        self._background = Background()
        self._refusing = asyncio.Event()  # set while STOPPED, FATAL or CLOSED: a start waiting gives up

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def label(self) -> str:
        """The model's name, with the replica's number when it has several: "qwen", "qwen#2"."""
        return f"{self.name}#{self.index + 1}" if self.config.replicas > 1 or self.index else self.name

    @property
    def estimate(self) -> Estimate:
        """What one worker with these settings comes to hold (supervisor/decide/estimate.py)."""
        return estimate(self.gguf.shape, self.config)

    @property
    def lines(self) -> MemoryLines:
        """The memory lines its workers run under: configured, or derived from the estimate."""
        return memory_lines(self.config, self.estimate)

    @property
    def status(self) -> str:
        """What Status shows: FATAL and STOPPED as such, else its worker's state (EXITED without one)."""
        if self.state == ReplicaState.FATAL:
            return "FATAL"
        if self.state == ReplicaState.STOPPED and (self.worker is None or not self.worker.alive):
            return "STOPPED"
        return self.worker.state.value if self.worker else WorkerState.EXITED.value

    @property
    def fatal_reason(self) -> str:
        return self.reason if self.state == ReplicaState.FATAL else ""

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
        return self.state not in REFUSING and self.thermal.cool.is_set()

    @property
    def holds_memory(self) -> bool:
        """A worker of this model is running, draining or loading (admitted: it counts against the budgets)."""
        return self._launching is not None or any(w is not None and w.alive for w in (self.worker, *self.retiring))

    @property
    def idle(self) -> bool:
        """No request running or queued: evicting it now costs nobody a wait."""
        return self.worker is not None and self.worker.state == WorkerState.READY and not self.queue.load

    def usage(self) -> Usage:
        """What this replica's live workers hold now, by their latest samples."""
        latest = [w.watch.periodic[-1] for w in {self.worker, *self.retiring}  # a set: a draining worker is both
                  if w is not None and w.alive and w.watch.periodic]
        return Usage(sum(s.private for s in latest), sum(s.gpu or 0 for s in latest))

    def sample(self, worker: WorkerProcess, gpus: GpuSnapshot | None = None):
        return self.monitor.sample(worker.pid, worker.requests_served, gpus, context=worker.context_high)

    def notify(self) -> None:
        """Tell the daemon something it shows changed (health, status line)."""
        self._on_change()

    def keep(self, work: Awaitable, name: str) -> asyncio.Task:
        """Work of this replica that nobody awaits, held until it ends."""
        return self._background.keep(work, name)

    def used(self) -> None:
        """A request ended (well or not): keep_alive counts from now."""
        self.last_used = self._clock()

    def unload_in(self) -> float:
        return unload_in(self.last_used, self._clock(), self.keep_alive)

    # -- its state ---------------------------------------------------------------------------------------
    def change_state(self, new: ReplicaState, reason: str = "") -> None:
        """Every change of the replica's state, checked and told (an event, the health service)."""
        if new == self.state:
            self.reason = reason or self.reason
            return
        if new not in ALLOWED[self.state]:
            raise RuntimeError(f"replica {self.label}: {self.state.value} → {new.value} is not allowed")
        self.events.emit("replica_state", self.name, "info", self.worker.pid if self.worker else 0, reason,
                         state=new.value, replica=self.index, old=self.state.value, new=new.value)
        self.state, self.reason = new, reason
        if new in REFUSING:
            self._refusing.set()
        else:
            self._refusing.clear()
        self._on_change()

    def refusal(self) -> ApiError | None:
        """What a request is told while no worker may start for it; None when one may."""
        if self.state == ReplicaState.CLOSED:
            return ApiError(self.closed_code, f"model {self.name!r} {self.reason}")
        if self.state == ReplicaState.STOPPED:
            return unavailable(f"model {self.name!r} is STOPPED: {self.reason}; `llmctl start {self.name}` starts it again")
        if self.state == ReplicaState.FATAL:
            return unavailable(f"model {self.name!r} is FATAL: {self.reason}; `llmctl start {self.name}` or loading "
                               f"it again retries")
        return None

    # -- the one road to a new worker ------------------------------------------------------------------
    def ensure_worker(self, warm_after: WorkerProcess | None = None, after: float = 0.0,
                      after_exit: WorkerProcess | None = None) -> asyncio.Task[WorkerProcess]:
        """The start in progress, or a new one: there is never more than one. `after` seconds of back-off
        first, or until `after_exit` has exited (a replacement the budgets cannot hold beside it). With
        `warm_after`, the new worker loads now but runs its warm-up only once that (draining) worker is idle:
        two processes computing on the same cores slow each other several times over."""
        if self._starting is None or self._starting.done():
            # FATAL and STOPPED are left only by hand (start_by_hand) or a reload: the start then refuses.
            if self.state == ReplicaState.UNLOADED:
                self.change_state(ReplicaState.STARTING, "starting")
            # A context of its own: the request that asked for the start is not the start's (its log lines
            # would carry that request's labels, api=… and all).
            self._starting = asyncio.create_task(self._start(after, after_exit, warm_after),
                                                 name=f"start-{self.label}", context=contextvars.Context())
        return self._starting

    async def start(self) -> WorkerProcess:
        """Start a worker (or join the start in progress). Raises ApiError when it cannot load."""
        return await asyncio.shield(self.ensure_worker())

    async def ready_worker(self) -> WorkerProcess:
        """The serving worker, started if there is none. BUSY counts as serving: callers that do not hold
        the queue's slot (Tokenize, a recycle by hand) must not take a busy worker for a missing one."""
        if self.serving:
            return self.worker
        refused = self.refusal()
        if refused is not None:
            raise refused
        return await self.start()

    async def _start(self, after: float, after_exit: WorkerProcess | None,
                     warm_after: WorkerProcess | None) -> WorkerProcess:
        if after:
            await self._unless_refused(asyncio.sleep(after))
        if after_exit is not None:
            await self._unless_refused(after_exit.exited.wait())
        if self.state == ReplicaState.BACKOFF:
            self.change_state(ReplicaState.STARTING, "back-off over")
        try:  # a replica refusing starts is refused right here, by the first _unless_refused
            # Every start comes this way — a request's, a restart's, a recycle's, Tokenize's, llmctl start's:
            # none loads a worker onto a GPU that is still past its temperature line.
            await self._unless_refused(self.thermal.wait("not starting a worker", self.config.request_timeout))
            if self._admit is not None:
                # Awaited here, not in a task of its own: admission's reservation ends as it returns, and
                # _launch must count the worker before anything else runs (no await in between).
                await self._admit(self)
        except Exception as e:  # too hot or no room now: the next request tries again, the model is not FATAL
            raise self._not_started(e) from None
        try:
            worker = await self._launch(warm_after)
        except ApiError as e:
            if not self._failed_first_load(e) and self.state not in REFUSING:
                self.change_state(ReplicaState.FATAL, e.message)
            raise
        except Exception as e:  # the OS refused (fork: EAGAIN, ENOMEM): no verdict on the model, try again later
            raise self._not_started(e) from None
        self._install(worker)
        return worker

    def _not_started(self, e: Exception) -> ApiError:
        """A start that did not happen, for no fault of the model: UNLOADED (the next request tries again),
        never FATAL; what the caller is told."""
        error = e if isinstance(e, ApiError) else unavailable(f"model {self.name!r}: cannot start a worker: {e!r}")
        self.last_exit = error.message
        if not self._failed_first_load(error) and self.state in (ReplicaState.STARTING, ReplicaState.REPLACING):
            self.change_state(ReplicaState.UNLOADED, error.message)
        return error

    async def _unless_refused(self, waited: Awaitable[T]) -> T:
        """`waited`, or the refusal as soon as the replica is stopped, FATAL or closed meanwhile: an unload,
        a shutdown or `llmctl stop` does not wait out a back-off or a hot GPU, and whoever waits for the
        start learns why."""
        work = asyncio.ensure_future(waited)
        refusing = asyncio.ensure_future(self._refusing.wait())
        try:
            await asyncio.wait({work, refusing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refusing.cancel()
            if not work.done():
                work.cancel()  # refused, or this start itself cancelled: nothing may go on waiting for it
        refused = self.refusal()
        if refused is not None:  # a tie goes to the refusal
            raise refused
        return work.result()

    async def _launch(self, warm_after: WorkerProcess | None) -> WorkerProcess:
        refused = self.refusal()
        if refused is not None:
            raise refused
        # '/' (an Ollama namespace) is no part of a file name: '+', which no name holds, so no two names
        # meet (and not '%', which gRPC's unix: addresses decode)
        file_name = self.name.replace("/", "+")
        socket_path = self._socket_dir / f"{file_name}.{self.index}.{next(self._serial)}.sock"
        worker = WorkerProcess(Spawn(self.config, self.gguf.path, socket_path, self.lines.rlimit_data),
                               self.events, self.output)
        self._launching = worker  # from here it holds memory: no await between admission and this line
        try:
            await worker.start(self._standby.take() if self._standby else None)
            if warm_after is not None:
                await quiet(warm_after)
            refused = self.refusal()
            if refused is not None:  # unloaded or stopped while it loaded
                await worker.stop()
                raise refused
            await worker.warm_up()
        finally:
            self._launching = None
            if self._standby:
                self._standby.refill()  # now, not earlier: its imports would have slowed this start
        return worker

    def _install(self, worker: WorkerProcess) -> None:
        """Make `worker` the one requests go to. Its baseline is taken now, after the warm-up it ran at load.
        A replica stopped, FATAL or closed during the warm-up does not take it: it is stopped instead."""
        refused = self.refusal()
        if refused is not None:
            self.keep(worker.stop(), f"stop-{worker.pid}")
            raise refused
        # The previous worker's channel is left to the garbage collector: closing it while a request
        # may still be reading its last call would cancel that call under the request's feet.
        self.worker = worker
        self.close_on_failure = False  # its first start is done: a later failed start is a restart's
        self.last_used = self._clock()
        worker.ready_at = time.monotonic()  # not the replica's clock: requests compare it with their arrival
        lines = self.lines
        worker.context_high = lines.warm_context  # its warm-up filled one n_batch
        worker.watch = WorkerHistory(baseline=self.sample(worker))
        worker.limits = limits_for(self.config, lines, self.rng)
        worker.on_exit = self._exited
        self.change_state(ReplicaState.SERVING, "serving")
        if worker.exited.is_set():  # it died between its warm-up and now
            self._exited(worker)
        elif self.thermal.critical:  # its GPU crossed temperature_critical while it loaded: not there
            self.unload(self.thermal.reason)

    def reconcile(self) -> None:
        """Level-triggered, each watchdog pass (supervisord's transition(), gunicorn's manage_workers): a
        replica that should have a worker and has none, and none on its way, gets one. The edges (exits,
        recycles, requests) normally see to that; this is the net under them."""
        if self.state not in WANTS_WORKER or (self.worker is not None and self.worker.alive):
            return  # a worker being killed (STOPPING) is still there: its exit starts the replacement
        if self._starting is not None and not self._starting.done():
            return
        if self.state == ReplicaState.REPLACING and any(w.alive for w in self.retiring):
            return  # the replacement waits for the old worker: it has a start of its own
        log.warning("reconcile_start", model=self.label, state=self.state.value)
        self._restart()

    # -- exits -----------------------------------------------------------------------------------------
    def _exited(self, worker: WorkerProcess) -> None:
        """Edge-triggered on a worker's exit, before anything waiting for that exit wakes (supervisord's
        finish()): a request about to retry then finds the restart, or the FATAL verdict, already decided
        — never a dead worker it would start a second replacement for. One nobody asked for is a crash,
        restarted with back-off."""
        self.last_exit = worker.exit_reason
        self._on_change()
        if self.state in REFUSING or worker.stop_requested or worker is not self.worker:
            return
        if worker.kill_reason and not (worker.kill_kind == "memory" and not worker.busy_since):
            self._restart()  # the watchdog's hard line, a hang, a timeout, llmctl restart: a recycle, not a crash
            return
        # A crash — or a hard memory line crossed before the worker ever had a request, which every fresh
        # worker would cross again: restarting it at once would loop, so it backs off and ends FATAL.
        self.restarts += 1
        advice = hopeless(worker.returncode, self.name)
        if advice:  # the same death on every restart: FATAL at once, saying what to do
            self.events.emit("worker_crashed", self.name, "error", worker.pid, worker.exit_reason, restarts=self.restarts)
            self._fatal(worker, f"its worker was {worker.exit_reason}: {advice}")
            return
        # Killed by a memory line before any request: fast, however long its load took.
        fast = worker.uptime() < FAST_FAILURE_S or (worker.kill_kind == "memory" and not worker.busy_since)
        self._fast_failures = self._fast_failures + 1 if fast else 1
        self.events.emit("worker_crashed", self.name, "warning", worker.pid, worker.exit_reason,
                         restarts=self.restarts, fast_failures=self._fast_failures)
        if self._fast_failures > self.config.max_restarts:
            self._fatal(worker, f"its worker died {self._fast_failures} times in a row within {FAST_FAILURE_S:g} s "
                                f"of starting (max_restarts = {self.config.max_restarts}); last: {worker.exit_reason}")
            return
        if self._starting is not None and not self._starting.done():
            return  # a request found the worker dying and already started its replacement: that one takes over
        delay = restart_delay(self._fast_failures - 1)
        if delay:
            worker.change_state(WorkerState.BACKOFF, f"restart in {delay:g} s")
            self.change_state(ReplicaState.BACKOFF, f"restart in {delay:g} s: {worker.exit_reason}")
        else:
            self.change_state(ReplicaState.STARTING, f"restart: {worker.exit_reason}")
        self._restart(delay)

    def _fatal(self, worker: WorkerProcess, reason: str) -> None:
        self.change_state(ReplicaState.FATAL, reason)
        self.events.emit("model_fatal", self.name, "error", worker.pid, reason, state="FATAL")

    def _restart(self, delay: float = 0.0) -> None:
        """Start a worker after `delay` (requests arriving meanwhile wait for this start instead of starting
        their own), or join the start in progress; a failure is logged (the model is FATAL then)."""
        self.report(self.ensure_worker(after=delay))

    def report(self, start: asyncio.Task[WorkerProcess]) -> None:
        """A start nobody waits for: held until it ends, and its failure logged."""
        self.keep(self._report_restart(start), f"restart-{self.label}")

    async def _report_restart(self, start: asyncio.Task[WorkerProcess]) -> None:
        try:
            await asyncio.shield(start)
        except ApiError as e:
            log.error("worker_restart_failed", model=self.name, reason=e.message)

    # -- retiring a worker -----------------------------------------------------------------------------
    def retire(self, worker: WorkerProcess, reason: str,
               replacement: asyncio.Task[WorkerProcess] | None = None) -> asyncio.Task:
        """DRAINING now (no new request goes to it); stopped once its request in flight has finished.
        Synchronous up to the DRAINING mark, so two decisions in one tick cannot both act on it."""
        worker.stop_requested = True  # its exit is not a crash
        worker.change_state(WorkerState.DRAINING, reason)
        self.retiring.add(worker)
        return self.keep(self._retire(worker, reason, replacement), f"retire-{worker.pid}")

    async def _retire(self, old: WorkerProcess, reason: str,
                      replacement: asyncio.Task[WorkerProcess] | None) -> WorkerProcess | None:
        fresh = None
        try:
            if replacement is not None:
                try:
                    fresh = await asyncio.shield(replacement)
                except Exception as e:
                    log.error("worker_recycle_failed", model=self.name, worker_pid=old.pid, error=str(e))
            await old.idle.wait()  # the request it had, if any, finishes on it
        finally:  # whatever happened to the replacement, the old worker goes
            try:
                await asyncio.shield(old.stop())
            finally:
                self.retiring.discard(old)
        if fresh is None:
            self.last_exit = reason
            self._on_change()
        return fresh

    def unload(self, reason: str) -> asyncio.Task | None:
        """The worker drains and exits, and none starts until a request asks (keep_alive, an eviction, a
        critical GPU). Returns the retirement to await (None when no worker serves)."""
        worker = self.worker
        if worker is None or worker.state not in SERVING_STATES:
            return None
        retired = self.retire(worker, reason)
        if self.state == ReplicaState.SERVING:
            self.change_state(ReplicaState.UNLOADED, reason)
        return retired

    def evict(self, reason: str) -> asyncio.Task | None:
        """Unload to make room for another model. DRAINING at once, before this returns: nothing can send
        it a request after admission chose it."""
        if self.serving:
            self.events.emit("model_evicted", self.name, "info", self.worker.pid, reason, **memory_figures(self.worker))
        return self.unload(reason)

    # -- by hand and by reload -------------------------------------------------------------------------
    async def stop_by_hand(self, reason: str) -> WorkerProcess | None:
        """llmctl stop: the worker finishes its request and exits; none starts until `start_by_hand`.
        Requests meanwhile get UNAVAILABLE saying so. Returns the worker stopped, if one ran."""
        if self.state == ReplicaState.CLOSED:
            return None
        # STOPPED first: a start waiting out a back-off or a hot GPU gives up now, one loading stops its
        # worker. Shielded: a client that gives up on its stop must not cancel the start or the drain.
        self.change_state(ReplicaState.STOPPED, reason)
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(asyncio.shield(self._starting), return_exceptions=True)
        worker = self.worker
        if worker is None or worker.state not in SERVING_STATES:
            return None
        await asyncio.shield(self.retire(worker, reason))
        return worker

    async def start_by_hand(self) -> tuple[WorkerProcess, bool]:
        """llmctl start: a worker serving now (a FATAL model gets a fresh set of tries); (worker, whether
        one already ran)."""
        running = self.serving
        if self.state in (ReplicaState.STOPPED, ReplicaState.FATAL):
            self._fast_failures = 0
            self.change_state(ReplicaState.STARTING, "started by hand")
        return await self.ready_worker(), running

    async def reconfigure(self, config: ModelConfig, gguf: GGUFInfo, keys: tuple[str, ...], new_worker: bool) -> None:
        """New settings from a reloaded config. Those baked into the worker process take a graceful
        recycle (returns once the replacement serves); the rest apply to the running worker at once."""
        self.config, self.gguf = config, gguf
        self.keep_alive = config.keep_alive
        worker = self.worker
        if worker is not None and worker.alive:
            worker.limits = limits_for(config, self.lines, self.rng)
        if self.state == ReplicaState.FATAL:  # perhaps what the change fixed
            self._fast_failures = 0
            self.change_state(ReplicaState.STARTING, "config changed")
            await self.start()
        elif new_worker and self.serving:
            self.recycles.graceful(worker, f"config changed: {', '.join(keys)}", kind="config")
            await self.start()

    def refuse_for_good(self, error: ApiError) -> None:
        """CLOSED now, before any await: a load that failed leaves nothing a queued request could start
        again (a second admission, evicting models for a runtime on its way out); each is told the
        load's own status (RESOURCE_EXHAUSTED with the figures, say). `stop` then stops what runs."""
        if self.state != ReplicaState.CLOSED:  # an unload meanwhile has closed it already
            self.closed_code = error.code
            self.change_state(ReplicaState.CLOSED, f"could not be loaded: {error.message}")

    def _failed_first_load(self, error: ApiError) -> bool:
        """Whether this failed start was the first load's (close_on_failure): closed for good, then."""
        if self.close_on_failure:
            self.refuse_for_good(error)
        return self.close_on_failure

    async def stop(self, grace: float = 5.0, reason: str = "is being unloaded") -> None:
        """Stop for good: what is still running fails with UNAVAILABLE and `reason` ("model 'x' <reason>").
        The runtime drains the requests first (supervisor/serving/runtime.py)."""
        self.change_state(ReplicaState.CLOSED, reason)
        # Draining workers too: an unload or shutdown must not leave them to finish on their own. They go
        # first, since a replacement's start may be waiting for them to be idle.
        # One still loading is stopped too: a shutdown must not wait out a load of minutes.
        workers = [w for w in (self.worker, *self.retiring, self._launching) if w is not None]
        await asyncio.gather(*(w.stop(grace) for w in workers))
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.worker is not None and self.worker not in workers:
            await self.worker.stop(grace)
        self.output.followers.close()
        self._on_change()
