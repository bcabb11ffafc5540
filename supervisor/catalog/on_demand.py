"""Models by name, loaded or not: a request for a model on disk that is not loaded loads it (through
admission, which evicts idle models as for any start) while the request waits in its queue, when
`load_on_demand` is on. What is on disk is the scanner's (catalog/scanner.py): read again for a listing
and for a name not found, so a file added or removed is seen without a restart."""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from supervisor.catalog.catalog import Available
from supervisor.catalog.scanner import Scanner
from supervisor.catalog.registry import Registry
from supervisor.errors import ApiError, precondition, unavailable
from supervisor.serving.runtime import ModelRuntime
from supervisor.settings.config import MAX_STOP_SEQUENCES, ConfigError, ModelConfig, model_config
from supervisor.settings.gguf_file import GGUFInfo
from supervisor.supervision.states import ReplicaState
from supervisor.tasks import Background

log = structlog.get_logger("llm_supervisor.catalog")

FAILED_LOAD_S = 30.0  # a model that failed to load on demand is not tried again for this long


class OnDemand:
    def __init__(self, registry: Registry, clock=time.monotonic) -> None:
        self.registry = registry
        self.scanner = Scanner(registry, clock)
        self._clock = clock
        self._loading: dict[str, tuple[asyncio.Future, asyncio.Task]] = {}  # name → (listed, whole load)
        self._failed: dict[str, tuple[float, ApiError]] = {}  # name → (when, why) of a failed load on demand
        self._background = Background()  # a load goes on for the others when the request that began it goes

    async def refreshed(self, runtime: ModelRuntime) -> None:
        """A model loaded on demand whose worker is not running (keep_alive, an eviction; or FATAL): if the
        disk now gives its name another file, or none, or other settings (`ollama create` with a new
        SYSTEM, a reload's [defaults]), it is unloaded, so the request that wakes it loads what the disk
        has — not a file `ollama pull` replaced (and may have deleted)."""
        loading = self._loading.get(runtime.name)
        if runtime.source != "catalog" or not asleep(runtime) or (loading is not None and not loading[1].done()):
            return  # (a load in progress: listed, its start not yet begun — not asleep, new)
        await self.scanner.rescan()
        on_disk = self.scanner.last.models.get(runtime.name)
        if self.registry.models.get(runtime.name) is runtime and asleep(runtime) and not runtime.waiting and (
                on_disk is None or on_disk.path != runtime.gguf.path or self._settings(on_disk) != runtime.config):
            log.info("model_file_followed", model=runtime.name, loaded=str(runtime.gguf.path),
                     on_disk=str(on_disk.path) if on_disk else None)
            await self.registry.unload(runtime.name, reason="was unloaded: its file or settings changed on disk")

    def resolve(self, name: str) -> str:
        """The name a client means: Ollama's clients add a tag (`demo:latest` for `demo`) or leave out
        `:latest` (`llama3` for `llama3:latest`). A loaded model's name wins over one only on disk."""
        candidates = [name]
        if name.endswith(":latest"):
            candidates.append(name[:-len(":latest")])
        elif ":" not in name.rsplit("/", 1)[-1]:
            candidates.append(f"{name}:latest")
        for known in (self.registry.models, self.scanner.last.models):
            for candidate in candidates:
                if candidate in known:
                    return candidate
        return name

    async def found(self, name: str) -> str:
        """The name a client means, the disk read again first if it is neither loaded nor in the last scan."""
        name = self.resolve(name)
        if name not in self.registry.models and name not in self.scanner.last.models:
            await self.scanner.rescan()  # the scan in flight, or one just done: others asking for the name share it
            name = self.resolve(name)
            if name not in self.registry.models and name not in self.scanner.last.models:
                await self.scanner.rescan(fresh=True)  # still not there: a scan begun after this request, its turn come
                name = self.resolve(name)
        return name

    def available(self) -> list[Available]:
        """On disk, not loaded, as of the last scan."""
        return [model for name, model in self.scanner.last.models.items() if name not in self.registry.models]

    async def runtime(self, name: str) -> ModelRuntime:
        """The model's runtime, loaded now if it is on disk and may be; NOT_FOUND otherwise."""
        name = self.resolve(name)
        if not self.registry.config.load_on_demand:
            return self.registry.get(name)
        runtime = self.registry.models.get(name)
        loading = self._loading.get(name)
        if runtime is not None and loading is not None and not loading[0].done():
            # Listed but not yet handed over (several replicas: until all serve, as one's failure ends the
            # load): wait with the others.
            await asyncio.wait([loading[0], loading[1]], return_when=asyncio.FIRST_COMPLETED)
            return loading[0].result() if loading[0].done() else loading[1].result()
        if runtime is not None:
            await self.refreshed(runtime)
            if name in self.registry.models:
                return self.registry.get(name)
        name = await self.found(name)
        if name in self.registry.models or name not in self.scanner.last.models:
            return self.registry.get(name)
        failed = self._failed.get(name)
        if failed is not None and self._clock() - failed[0] < FAILED_LOAD_S:
            # A file the worker cannot load must not cost a process start, and the idle models admission
            # would evict for it, at every request.
            raise ApiError(failed[1].code, f"{failed[1].message} (failed {self._clock() - failed[0]:.0f} s ago; "
                                           f"tried again {FAILED_LOAD_S:g} s after)")
        loading = self._loading.get(name)
        if (loading is not None and loading[0].done() and loading[1].done()
                and self.registry.models.get(name) is not loading[0].result()):
            loading = None  # that load listed its runtime, which is gone since (its start failed): a load anew
        if loading is None:  # one load for every request that asks meanwhile
            registered = asyncio.get_running_loop().create_future()
            task = self._background.keep(self._load(self.scanner.last.models[name], registered), f"load-{name}")
            loading = self._loading[name] = (registered, task)
            task.add_done_callback(lambda _, entry=loading: self._loading.pop(name, None)
                                   if self._loading.get(name) is entry else None)
        registered, task = loading
        # Only until the model is listed (its file's header read): from then on the request waits for the
        # worker in the model's queue, where max_queue bounds the waiting and the load's outcome reaches it.
        await asyncio.wait([registered, task], return_when=asyncio.FIRST_COMPLETED)
        return registered.result() if registered.done() else task.result()

    def config_for(self, model: Available) -> ModelConfig:
        """Its settings: [models.NAME] if the config has the name, else [defaults], else its store's params.
        A store's value this daemon does not take is left out, said once in the log: the model serves
        with the rest, as Ollama would serve it."""
        configured = next((m for m in self.registry.config.models if m.name == model.name), None)
        if configured is not None:
            return configured
        defaults, host = self.registry.config.defaults, self.registry.host
        for key in sorted(set(model.params) - set(PARAMS)):  # num_predict, seed, penalties …: said, not silent
            self.scanner.tell_once("catalog_param_ignored", model=model.name, key=key, reason="not a setting this daemon takes")
        try:
            settings = {"path": str(model.path)}
            model_config(model.name, settings, defaults, host)  # [defaults] alone: its fault is not the store's
            for key, value in settings_of(model, defaults).items():
                try:
                    model_config(model.name, {**settings, key: value}, defaults, host)
                    settings[key] = value
                except ConfigError as e:
                    self.scanner.tell_once("catalog_param_ignored", model=model.name, key=key, reason=str(e))
            return model_config(model.name, settings, defaults, host)
        except ConfigError as e:  # [defaults] itself: a config without [models] tables never checked it
            raise precondition(f"model {model.name!r} cannot be loaded on demand: {e}") from None

    def _settings(self, model: Available) -> ModelConfig | None:
        try:
            return self.config_for(model)
        except ApiError:
            return None

    async def listing(self) -> list[tuple[Available, GGUFInfo | None, ModelConfig | None]]:
        """Every model on disk not loaded, read afresh, with its header and settings where they can be had
        (a damaged file or a setting the config refuses: None; its load would say why)."""
        await self.scanner.rescan()
        available = self.available()
        headers = await self.scanner.headers([model.path for model in available])
        return [(model, headers.get(model.path), self._settings(model)) for model in available]

    async def known(self) -> list[tuple[str, GGUFInfo]]:
        """Every model a request can name, with its header: the loaded ones, then those on disk (read
        afresh) — less any whose name a request would resolve to a loaded model instead."""
        loaded = [(runtime.name, runtime.gguf) for runtime in list(self.registry.models.values())]
        on_disk = [(model.name, header) for model, header, _ in await self.listing()
                   if header is not None and self.resolve(model.name) == model.name]
        return loaded + on_disk

    async def _load(self, model: Available, registered: asyncio.Future) -> ModelRuntime:
        started = self._clock()
        try:
            config = self.config_for(model)
            # A model the config names is the config's wherever it was loaded from: a reload manages it.
            source = "config" if model.source == "config" else "catalog"
            runtime = await self.registry.load(config, source=source, registered=registered)
        except ApiError as e:
            log.warning("load_on_demand_failed", model=model.name, path=str(model.path), reason=e.message)
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # the file or the load, not the request: 503
                e = unavailable(f"model {model.name!r} cannot start: {e.message}")
                # Only this is held against it: memory may be free at the next request, and an unload or a
                # shutdown during the load says nothing of the file.
                self._failed[model.name] = (self._clock(), e)
            raise e from None
        self._failed.pop(model.name, None)
        log.info("model_loaded", model=model.name, path=str(model.path), source=source, origin=model.source,
                 load_s=round(self._clock() - started, 3))
        return runtime


# An Ollama params layer's keys this daemon takes as a model's settings, and their names here.
PARAMS = {"num_ctx": "n_ctx", "stop": "stop", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "min_p": "min_p", "repeat_penalty": "repeat_penalty"}


def settings_of(model: Available, defaults) -> dict:
    """What a store's params and system layers say, as the model's settings where [defaults] does not say
    otherwise: its context length, and the request defaults (stop words, sampling, system prompt). Values
    of the wrong type are left out; the rest is checked as the config's own."""
    settings = {ours: model.params[theirs] for theirs, ours in PARAMS.items()
                if theirs in model.params and not isinstance(model.params[theirs], (bool, dict))}
    if isinstance(settings.get("stop"), list):  # Ollama takes any number; this daemon its first 16
        settings["stop"] = settings["stop"][:MAX_STOP_SEQUENCES]
    if model.system:
        settings["system"] = model.system
    return {key: value for key, value in settings.items() if key not in defaults}


def asleep(runtime: ModelRuntime) -> bool:
    """No worker running or starting: the next request starts one (after keep_alive, an eviction), or
    none can (FATAL)."""
    return all(replica.state in (ReplicaState.UNLOADED, ReplicaState.FATAL) and not replica.holds_memory
               for replica in runtime.replicas)

