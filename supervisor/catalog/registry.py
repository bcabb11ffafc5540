"""The loaded models: from the config at start, and loaded or unloaded at run time through the API."""

from __future__ import annotations

import asyncio
import re
import resource
from pathlib import Path
from typing import Awaitable, Callable, Mapping, TypeVar

import grpc
import psutil
import structlog

from supervisor.settings.config import ConfigError, Host, ModelConfig, SupervisorConfig, model_config
from supervisor.errors import ApiError, exhausted, invalid, not_found, precondition, unavailable
from supervisor.decide.estimate import Estimate, estimate, host_memory_note, mlock_refusal, unmapped_refusal
from supervisor.settings.gguf_file import GGUFInfo, read_gguf_info, resolve_model_path
from supervisor.observe.events import EventBus
from supervisor.serving.queue import RequestQueue
from supervisor.supervision.replica import Replica
from supervisor.observe.monitor import Monitor
from supervisor.process.output import OutputLog
from supervisor.observe.procfs import CAP_IPC_LOCK, has_capability
from supervisor.decide.policies import Resident, Usage, admission, mib, replacement_first, total
from supervisor.catalog.reload_plan import Change, Plan
from supervisor.catalog import persisted as state
from supervisor.serving.runtime import ModelRuntime
from supervisor.process.standby import StandbyPool
from supervisor.tasks import Background
from supervisor.catalog.persisted import LoadedModel

log = structlog.get_logger("llm_supervisor.registry")
T = TypeVar("T")


class Registry:
    def __init__(self, config: SupervisorConfig, host: Host, socket_dir: Path, monitor: Monitor, events: EventBus,
                 on_change: Callable[[ModelRuntime], None] = lambda rt: None,
                 standby: StandbyPool | None = None) -> None:
        self.config = config
        self.events = events
        self.host = host
        self.monitor = monitor
        self.models: dict[str, ModelRuntime] = {}
        self._socket_dir = socket_dir
        self._on_change = on_change
        self.standby = standby
        self.state_path = config.state_dir / "models.json"
        self._loaded_by_api: dict[str, LoadedModel] = {}
        self._admission = asyncio.Lock()
        self._reserved: set[Replica] = set()  # admitted, waiting for their victims to exit
        self._background = Background()
        self._leaving: set[Replica] = set()  # being stopped after an unload, a removal or fewer replicas
        self._reading: set[str] = set()  # names whose load is reading its file's header

    def get(self, name: str) -> ModelRuntime:
        runtime = self.models.get(name)
        if runtime is None:
            loaded = ", ".join(sorted(self.models)) or "none"
            raise not_found(f"unknown model {name!r}; loaded models: {loaded}")
        return runtime

    def model_config(self, name: str, path: str, options: Mapping[str, str]) -> ModelConfig:
        if "path" in options:
            raise invalid("give the path as the request's path, not as an option")
        try:
            return model_config(name, {**options, "path": path}, self.config.defaults, self.host)
        except ConfigError as e:
            raise invalid(str(e)) from None

    async def estimate(self, path: str, options: Mapping[str, str]) -> tuple[GGUFInfo, Estimate]:
        """What a model would cost with these options (LoadModel's), without loading it."""
        name = re.sub(r"[^A-Za-z0-9._:-]", "_", Path(path).stem)[:64] or "estimate"  # for its messages
        config = self.model_config(name, path, options)
        gguf = await asyncio.to_thread(read_gguf_info, resolve_model_path(config.path, self.config.model_dirs))
        return gguf, estimate(gguf.shape, config)

    async def load(self, config: ModelConfig, source: str, keep_on_failure: bool = False,
                   registered: asyncio.Future | None = None) -> ModelRuntime:
        """Check the file, then start the worker. A config model that fails stays listed as FATAL.
        `registered` learns the runtime as soon as it is listed (its start begun): requests may queue on it
        from then on, and wait there for the worker, as for any start. With several replicas, only once
        all serve: one replica's failed start tears the runtime down, and must not take requests already
        streaming on another with it."""
        if config.name in self.models or config.name in self._reading:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"model {config.name!r} is already loaded; unload it first or pick another name")
        self._reading.add(config.name)  # the name is taken from here: two loads of it never both go on
        try:
            path = resolve_model_path(config.path, self.config.model_dirs)
            gguf = await asyncio.to_thread(read_gguf_info, path)
        finally:
            self._reading.discard(config.name)
        runtime = ModelRuntime(source, [])  # its replicas tell the registry of their changes: they need it first
        runtime.replicas = [self._replica(runtime, config, gguf, i, OutputLog()) for i in range(config.replicas)]
        self.models[config.name] = runtime  # reserve the name while loading
        for replica in runtime.replicas:
            replica.close_on_failure = not keep_on_failure
        starting = asyncio.gather(*(replica.start() for replica in runtime.replicas), return_exceptions=True)
        if registered is not None and len(runtime.replicas) == 1:
            registered.set_result(runtime)
        started = await starting
        for replica in runtime.replicas:  # loaded: from here a failed start is a restart's, not the load's
            replica.close_on_failure = False
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            if not keep_on_failure:
                # Requests still queued on it (a load on demand) are told why it is gone, with its code;
                # it stays listed, closed, until its workers are stopped: a request meanwhile is told so,
                # rather than finding the name free and starting the same doomed load again.
                error = failed[0] if isinstance(failed[0], ApiError) else unavailable(repr(failed[0]))
                for replica in runtime.replicas:
                    replica.refuse_for_good(error)
                try:
                    await runtime.stop(reason=f"could not be loaded: {error.message}")
                finally:
                    if self.models.get(config.name) is runtime:  # an unload meanwhile has taken it already
                        del self.models[config.name]
                    self._on_change(runtime)
            raise failed[0]
        if registered is not None and not registered.done():
            registered.set_result(runtime)
        return runtime

    def _replica(self, runtime: ModelRuntime, config: ModelConfig, gguf: GGUFInfo, index: int,
                 output: OutputLog) -> Replica:
        queue = RequestQueue()
        replica = Replica(config, gguf, self._socket_dir, self.monitor, self.events,
                          on_change=lambda: self._on_change(runtime), standby=self.standby, room=self.room,
                          admit=self.admit, index=index, output=output, queue=queue)
        # A reload's new `parallel` holds at once. An embedding worker computes one request at a time: the
        # others wait here, where max_queue bounds them and the place after a cancel goes to the next.
        queue.capacity_from(lambda: 1 if replica.config.embedding else replica.config.parallel)
        return replica

    async def _whole(self, work: Awaitable[T], name: str) -> T:
        """`work`, run to its end whatever becomes of the caller: a client that gives up (a cancelled RPC)
        never leaves an operation half applied."""
        return await asyncio.shield(self._background.keep(work, name))

    def replicas(self) -> list[Replica]:
        """Every replica of every model, and those of models on their way out: until their workers have
        exited, the watchdog still watches them and admission still counts their memory."""
        listed = [replica for runtime in list(self.models.values()) for replica in runtime.replicas]
        return listed + [replica for replica in list(self._leaving) if replica not in listed]

    async def _stop(self, runtime: ModelRuntime, reason: str, replicas: list[Replica] | None = None) -> None:
        """Stop a model's replicas (all, or those given) after the drain, watched and counted until gone."""
        leaving = list(runtime.replicas if replicas is None else replicas)
        self._leaving.update(leaving)
        try:
            await runtime.stop(drain=self.config.shutdown_timeout, reason=reason, replicas=leaving)
        finally:
            self._leaving.difference_update(leaving)

    async def admit(self, starting: Replica) -> None:
        """Before any worker starts: within memory_budget, gpu_memory_budget and max_loaded_models, by the
        estimate at full context (or what a worker holds, if more). Idle models are evicted least recently
        used first, never pinned ones; RESOURCE_EXHAUSTED with the figures when that is not enough.
        One decision at a time, so two loads cannot both take the same room; the start counts as holding
        its room from the decision until its worker is launching. The victims' exits are awaited outside
        the lock: a slow exit holds up this start only, not every start on the daemon (crash restarts
        included)."""
        if self.config.gpu_memory_budget_percent and self.monitor.last_gpus is None:
            # Before the watch loop's first read, and outside the lock: a hung NVML holds up this start only.
            await asyncio.to_thread(self.monitor.host)
        async with self._admission:
            figures = starting.estimate
            needed = Usage(figures.private_peak, figures.gpu)
            self._check_host(starting, figures)
            c = self.config
            budget = self.budget()
            holders = {replica.label: replica for replica in self._holding() if replica is not starting}
            residents = [resident(replica) for replica in holders.values()]
            decision = admission(needed, budget, c.max_loaded_models, residents, model=starting.name)
            if decision.refused:
                raise exhausted(refusal(starting.label, needed, budget, c.max_loaded_models, residents, decision.refused))
            # No await from the decision to here: the victims are DRAINING before any request can reach them.
            retiring = []
            for label in decision.evict:
                log.info("evicting", model=label, for_model=starting.label)
                retiring.append(holders[label].evict(f"evicted to make room for {starting.label!r}"))
            self._reserved.add(starting)
        try:
            await asyncio.gather(*(task for task in retiring if task is not None))
        finally:
            # The caller launches at once, without yielding: from there on its worker counts as held.
            self._reserved.discard(starting)

    def _holding(self) -> list[Replica]:
        """The replicas whose memory counts against the budgets: a worker running, draining or loading,
        or a start admitted and waiting for its victims to exit."""
        return [replica for replica in self.replicas() if replica.holds_memory or replica in self._reserved]

    @staticmethod
    def _check_host(starting: Replica, figures: Estimate) -> None:
        """What the host allows whatever the budgets: locked weights within RLIMIT_MEMLOCK, weights read
        into memory within the free RAM. Notes weights that are mmap'd past the free RAM."""
        available = psutil.virtual_memory().available
        if starting.config.use_mlock:
            memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            refused = mlock_refusal(figures, -1 if memlock == resource.RLIM_INFINITY else memlock,
                                    has_capability(CAP_IPC_LOCK))
            if refused:
                raise precondition(f"model {starting.name!r}: {refused}")
        refused = unmapped_refusal(figures, available)
        if refused:
            raise exhausted(f"model {starting.name!r}: {refused}")
        starting.memory_note = host_memory_note(figures, available)

    def budget(self) -> Usage:
        """memory_budget and gpu_memory_budget in bytes (0: none). A GPU budget in % is of the GPUs' total
        memory by NVML's last read; without a GPU it bounds nothing."""
        c = self.config
        gpu = c.gpu_memory_budget or 0
        if c.gpu_memory_budget_percent and self.monitor.last_gpus is not None:
            total = sum(r.memory_total for r in self.monitor.last_gpus.readings)
            gpu = int(total * c.gpu_memory_budget_percent / 100)
        return Usage(c.memory_budget or 0, gpu)

    def room(self, needed: Usage) -> tuple[bool, str]:
        """Whether the memory budgets hold `needed` beside every worker running now, counted as admission
        counts them."""
        held = total(resident(replica).usage for replica in self._holding())
        return replacement_first(self.budget(), held, needed)

    async def load_by_api(self, request: LoadedModel, source: str = "api", keep_on_failure: bool = False) -> ModelRuntime:
        """A model loaded at run time: recorded in the state directory, so a restart loads it again.
        Shielded: a client that gives up on its LoadModel leaves a model loaded and recorded (or, failed,
        removed), never listed and unrecorded."""
        config = self.model_config(request.name, request.path, request.options)

        async def load_and_record() -> ModelRuntime:
            runtime = await self.load(config, source, keep_on_failure)
            self._loaded_by_api[request.name] = request
            await self._record()
            return runtime

        return await self._whole(load_and_record(), f"load-{request.name}")

    async def restore(self) -> None:
        """Load again what the API had loaded before a restart; a model the config now names is the
        config's. One that fails to load is listed FATAL, and stays recorded for the next start."""
        for request in state.load(self.state_path):
            if request.name in self.models:
                log.warning("state_model_skipped", model=request.name, reason="the config has a model of this name")
                continue
            try:
                await self.load_by_api(request, source="state", keep_on_failure=True)
                log.info("model_loaded", model=request.name, source="state")
            except ApiError as e:
                self._loaded_by_api[request.name] = request
                log.error("model_load_failed", model=request.name, source="state", reason=e.message)
        await self._record()

    async def _record(self) -> None:
        try:
            await state.record(self.state_path, list(self._loaded_by_api.values()))
        except OSError as e:  # a read-only state directory costs the record, not the running models
            log.error("state_not_saved", path=str(self.state_path), error=str(e))

    async def unload(self, name: str, reason: str = "was unloaded") -> None:
        """Take the model out now (new requests get NOT_FOUND); those queued or in flight finish first,
        for shutdown_timeout at most."""
        runtime = self.get(name)
        del self.models[name]
        recorded = self._loaded_by_api.pop(name, None) is not None

        async def finish() -> None:
            if recorded:
                await self._record()
            await self._stop(runtime, reason)

        # Whole: a client that cancels its UnloadModel must not leave a model out of the list whose
        # workers nobody stops.
        await self._whole(finish(), f"unload-{name}")

    async def stop_all(self, reason: str) -> None:
        """Every model, as unload does, at once."""
        runtimes = list(self.models.values())
        self.models.clear()
        await asyncio.gather(*(self._stop(rt, reason) for rt in runtimes), return_exceptions=True)

    # -- reload ----------------------------------------------------------------------------------------
    def running(self) -> dict[str, tuple[ModelConfig, str]]:
        return {name: (rt.config, rt.source) for name, rt in self.models.items()}

    async def update(self, config: SupervisorConfig, plan: Plan) -> dict[str, str]:
        """Apply a reload: the new settings, then removals (their memory may be what the rest needs),
        then changes and additions together. Returns what failed, by model; the rest applies regardless.
        Shielded: a reload whose client gives up is applied whole, not half."""
        return await self._whole(self._update(config, plan), "reload")

    async def _update(self, config: SupervisorConfig, plan: Plan) -> dict[str, str]:
        self.config = config
        errors: dict[str, str] = {}

        async def attempt(name: str, work) -> None:
            try:
                await work
            except ApiError as e:
                errors[name] = e.message
                log.error("reload_failed", model=name, reason=e.message)

        await asyncio.gather(*(attempt(name, self.unload(name, reason="was removed from the config"))
                               for name in plan.removed))
        await asyncio.gather(*(attempt(c.config.name, self._reconfigure(c)) for c in plan.changed),
                             *(attempt(m.name, self.load(m, source="config", keep_on_failure=True)) for m in plan.added))
        return errors

    async def _reconfigure(self, change: Change) -> None:
        runtime = self.get(change.config.name)
        gguf = runtime.gguf
        if "path" in change.keys:
            gguf = await asyncio.to_thread(read_gguf_info, resolve_model_path(change.config.path, self.config.model_dirs))
        if runtime.source != "config":  # the file takes it over: no longer the API's to restore
            runtime.source = "config"
            self._loaded_by_api.pop(runtime.name, None)
            await self._record()
        # One replica after another: while one is recycled, the others serve. Each gets the new settings
        # whatever became of the one before: a reload half applied would look applied to the next one.
        replicas = runtime.replicas
        failed: list[BaseException] = []
        for replica in replicas[:change.config.replicas]:
            try:
                await replica.reconfigure(change.config, gguf, change.keys, change.new_worker)
            except ApiError as e:
                failed.append(e)
            finally:
                replica.queue.refresh()  # a larger `parallel` lets waiting requests in now
        extra, added = replicas[change.config.replicas:], range(len(replicas), change.config.replicas)
        runtime.replicas = replicas[:change.config.replicas] + [
            self._replica(runtime, change.config, gguf, i, runtime.output) for i in added]
        # The stop whole: a ReloadConfig whose client gives up must not leave replicas half stopped.
        stopping = self._whole(self._stop(runtime, "was stopped: fewer replicas", extra), f"fewer-replicas-{runtime.name}")
        results = await asyncio.gather(stopping, *(replica.start() for replica in runtime.replicas[len(replicas):]),
                                       return_exceptions=True)
        failed += [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]


def refusal(name: str, needed: Usage, budget: Usage, max_models: int, residents: list[Resident], broken: str) -> str:
    """RESOURCE_EXHAUSTED's message: what the model needs, the limits it breaks and what holds the room."""
    held = ", ".join(f"{r.name} {mib(r.usage.private)}" + (f" + {mib(r.usage.gpu)} GPU" if r.usage.gpu else "")
                     + (" (pinned)" if r.pinned else "" if r.idle else " (busy)") for r in residents) or "nothing"
    limits, in_use = [], total(r.usage for r in residents)
    if "memory_budget" in broken:
        limits.append(f"memory_budget is {mib(budget.private)} with {mib(in_use.private)} held")
    if "gpu_memory_budget" in broken:
        limits.append(f"gpu_memory_budget is {mib(budget.gpu)} with {mib(in_use.gpu)} held")
    if "max_loaded_models" in broken:
        # Models, not replicas: as the policy counts them.
        limits.append(f"max_loaded_models is {max_models} with {len({r.model_name for r in residents})} loaded")
    gpu = f" and {mib(needed.gpu)} of GPU memory" if needed.gpu else ""
    return (f"model {name!r} does not fit: it needs {mib(needed.private)} of host memory at full context{gpu} "
            f"(`llmctl estimate` shows the parts); {'; '.join(limits)}; loaded: {held}. Only idle models that are "
            f"not pinned are evicted to make room; unload one, or lower n_ctx, type_k/type_v or n_gpu_layers")


def resident(replica: Replica) -> Resident:
    """A replica as admission counts it: its estimate at full context, or what it holds if more (a leak)."""
    figures, measured = replica.estimate, replica.usage()
    return Resident(replica.label, Usage(max(figures.private_peak, measured.private), max(figures.gpu, measured.gpu)),
                    replica.last_used, replica.config.pinned, replica.idle, model=replica.name)
