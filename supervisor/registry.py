"""The loaded models: from the config at start, and loaded or unloaded at run time through the API."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Callable, Mapping

import grpc
import structlog

from .config import ConfigError, Host, ModelConfig, SupervisorConfig, model_config
from .errors import ApiError, invalid, not_found
from .estimate import Estimate, estimate
from .gguf_file import GGUFInfo, read_gguf_info, resolve_model_path
from .events import EventBus
from .lifecycle import Lifecycle
from .monitor import Monitor
from .policies import Usage, replacement_first
from .reload import Change, Plan
from . import state
from .scheduler import ModelRuntime
from .standby import StandbyPool
from .state import LoadedModel

log = structlog.get_logger("llm_supervisor.registry")


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

    async def load(self, config: ModelConfig, source: str, keep_on_failure: bool = False) -> ModelRuntime:
        """Check the file, then start the worker. A config model that fails stays listed as FATAL."""
        if config.name in self.models:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"model {config.name!r} is already loaded; unload it first or pick another name")
        path = resolve_model_path(config.path, self.config.model_dirs)
        gguf = await asyncio.to_thread(read_gguf_info, path)
        # Late binding: the lambda reads `runtime` when a worker changes, by then it is assigned.
        lifecycle = Lifecycle(config, gguf, self._socket_dir, self.monitor, self.events,
                              on_change=lambda: self._on_change(runtime), standby=self.standby, room=self.room)
        runtime = ModelRuntime(source, lifecycle)
        self.models[config.name] = runtime  # reserve the name while loading
        try:
            await lifecycle.start()
        except ApiError:
            if not keep_on_failure:
                del self.models[config.name]
                self._on_change(runtime)
            raise
        return runtime

    def room(self, needed: Usage) -> tuple[bool, str]:
        """Whether the memory budgets hold `needed` beside every worker running now."""
        c = self.config
        budget = Usage(c.memory_budget or 0, c.gpu_memory_budget or 0) if (c.memory_budget or c.gpu_memory_budget) else None
        in_use = [rt.lifecycle.usage() for rt in self.models.values()]
        return replacement_first(budget, Usage(sum(u.private for u in in_use), sum(u.gpu for u in in_use)), needed)

    async def load_by_api(self, request: LoadedModel, source: str = "api", keep_on_failure: bool = False) -> ModelRuntime:
        """A model loaded at run time: recorded in the state directory, so a restart loads it again."""
        runtime = await self.load(self.model_config(request.name, request.path, request.options), source, keep_on_failure)
        self._loaded_by_api[request.name] = request
        self._record()
        return runtime

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
        self._record()

    def _record(self) -> None:
        try:
            state.save(self.state_path, list(self._loaded_by_api.values()))
        except OSError as e:  # a read-only state directory costs the record, not the running models
            log.error("state_not_saved", path=str(self.state_path), error=str(e))

    async def unload(self, name: str, reason: str = "was unloaded") -> None:
        """Take the model out now (new requests get NOT_FOUND); those queued or in flight finish first,
        for shutdown_timeout at most."""
        runtime = self.get(name)
        del self.models[name]
        if self._loaded_by_api.pop(name, None) is not None:
            self._record()
        await runtime.lifecycle.stop(drain=self.config.shutdown_timeout, reason=reason)

    async def stop_all(self, reason: str) -> None:
        """Every model, as unload does, at once."""
        runtimes = list(self.models.values())
        self.models.clear()
        await asyncio.gather(*(rt.lifecycle.stop(drain=self.config.shutdown_timeout, reason=reason)
                               for rt in runtimes), return_exceptions=True)

    # -- reload ----------------------------------------------------------------------------------------
    def running(self) -> dict[str, tuple[ModelConfig, str]]:
        return {name: (rt.config, rt.source) for name, rt in self.models.items()}

    async def update(self, config: SupervisorConfig, plan: Plan) -> dict[str, str]:
        """Apply a reload: the new settings, then removals (their memory may be what the rest needs),
        then changes and additions together. Returns what failed, by model; the rest applies regardless."""
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
            self._record()
        await runtime.lifecycle.reconfigure(change.config, gguf, change.keys, change.new_worker)
