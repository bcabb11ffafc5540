"""Models by name, loaded or not: a request for a model on disk that is not loaded loads it (through
admission, which evicts idle models as for any start) while the request waits, when `load_on_demand` is
on. The disk is read again for a listing and for a name not found, at most once a second (callers
meanwhile share one scan), so a file added or removed is seen without a restart."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import structlog

from supervisor.catalog.catalog import Available, Scan, scan
from supervisor.catalog.registry import Registry
from supervisor.errors import ApiError, precondition, unavailable
from supervisor.serving.runtime import ModelRuntime
from supervisor.settings.config import MAX_STOP_SEQUENCES, ConfigError, ModelConfig, model_config
from supervisor.settings.gguf_file import GGUFInfo, read_gguf_info
from supervisor.supervision.states import ReplicaState
from supervisor.tasks import Background

log = structlog.get_logger("llm_supervisor.catalog")

SCAN_EVERY_S = 1.0  # clients listing, or asking for names that do not exist, cannot make the daemon scan nonstop
FAILED_LOAD_S = 30.0  # a model that failed to load on demand is not tried again for this long


class OnDemand:
    def __init__(self, registry: Registry, clock=time.monotonic) -> None:
        self.registry = registry
        self.last = Scan({})
        self._clock = clock
        self._scan_began = -SCAN_EVERY_S
        self._scanning: asyncio.Task | None = None
        self._reported: frozenset[str] = frozenset()
        self._told: set[tuple] = set()  # warnings about models on disk, each logged once
        self.loaded_problems: tuple[str, ...] = ()  # loaded models whose file is gone or replaced, at the last scan
        self._loading: dict[str, tuple[asyncio.Future, asyncio.Task]] = {}  # name → (listed, whole load)
        self._failed: dict[str, tuple[float, ApiError]] = {}  # name → (when, why) of a failed load on demand
        self._background = Background()  # a load goes on for the others when the request that began it goes
        # GGUF headers by (path, size, mtime, inode, ctime): a listing reads each file's once, and again
        # only when it changed (a copy that kept the mtime still has another ctime).
        self._headers: dict[tuple, GGUFInfo] = {}

    async def rescan(self, fresh: bool = False) -> Scan:
        """The disk read again, at most once every SCAN_EVERY_S; callers meanwhile share one scan. Not
        `fresh` (a listing): within SCAN_EVERY_S of the last scan, that one's result. `fresh` (a request
        for a name not found): a scan begun after the call, waiting for its turn if need be — a file
        renamed into place is served by the next request, and a flood of misses costs one scan a second."""
        asked = self._clock()
        while True:
            if self._scanning is None:
                wait = self._scan_began + SCAN_EVERY_S - self._clock()
                if wait > 0:
                    if not fresh:
                        return self.last
                    await asyncio.sleep(wait)  # the rate limit's turn; another caller may begin it first
                    continue
                self._scan_began = self._clock()
                self._scanning = self._background.keep(self._scan(), "catalog-scan")
            scanning, began = self._scanning, self._scan_began
            await asyncio.shield(scanning)
            if not fresh or began >= asked:
                return self.last

    async def _scan(self) -> None:
        # Files of models the catalog resolved (an API load names its file on purpose: not compared).
        loaded = {runtime.name: (runtime.gguf.path, runtime.serving) for runtime in list(self.registry.models.values())
                  if runtime.source in ("catalog", "config")}
        try:
            config = self.registry.config
            self.last = await asyncio.to_thread(scan, config.model_dirs, {m.name: m.path for m in config.models})
            gone = await asyncio.to_thread(missing, {name: path for name, (path, _) in loaded.items()})
        except Exception as e:  # the disk's trouble: callers go on with the last scan; said once per kind
            self._tell_once("catalog_scan_failed", reason=f"{type(e).__name__}: {e}")
            return
        finally:
            self._scanning = None
        for problem in set(self.last.problems) - self._reported:  # each told once, not at every scan
            log.warning("catalog_skipped", reason=problem)
        self._reported = frozenset(self.last.problems)
        reports = dict(self._check_loaded(loaded, gone))
        for message in reports.keys() - set(self.loaded_problems):  # told when it appears, again if it comes back
            event, fields = reports[message]
            log.warning(event, reason=message, **fields)
        self.loaded_problems = tuple(reports)

    def _check_loaded(self, loaded: dict, gone: set[str]):
        """What became of the loaded models' files, as (message, (event, fields)): a file deleted under a
        worker is still mapped, so it serves on, but no new worker (a recycle, a restart) can start from
        it; a name the disk now gives another file (`ollama pull` moved a tag) keeps its loaded file while
        it serves. A model loaded on demand whose worker is not running follows the disk at its next
        request (`refreshed`)."""
        for name, (path, serving) in loaded.items():
            if name in gone:
                then = ("its workers serve from their mapping, but a recycle or restart cannot start a new one"
                        if serving else "no worker of it can start from it")
                yield (f"model {name!r}: its file {path} is gone; {then}",
                       ("model_file_missing", {"model": name, "path": str(path)}))
            on_disk = self.last.models.get(name)
            if on_disk is not None and on_disk.path != path:
                yield (f"model {name!r}: {on_disk.path} is its file on disk now; the loaded model serves {path} until "
                       f"it is unloaded (`llmctl unload {name}`, or its keep_alive: the next request loads the new one)",
                       ("model_file_changed", {"model": name, "loaded": str(path), "on_disk": str(on_disk.path)}))

    async def refreshed(self, runtime: ModelRuntime) -> None:
        """A model loaded on demand whose worker is not running (keep_alive, an eviction; or FATAL): if the
        disk now gives its name another file, or none, or other settings (`ollama create` with a new
        SYSTEM, a reload's [defaults]), it is unloaded, so the request that wakes it loads what the disk
        has — not a file `ollama pull` replaced (and may have deleted)."""
        loading = self._loading.get(runtime.name)
        if runtime.source != "catalog" or not asleep(runtime) or (loading is not None and not loading[1].done()):
            return  # (a load in progress: listed, its start not yet begun — not asleep, new)
        await self.rescan()
        on_disk = self.last.models.get(runtime.name)
        if self.registry.models.get(runtime.name) is runtime and asleep(runtime) and not runtime.waiting and (
                on_disk is None or on_disk.path != runtime.gguf.path or self._settings(on_disk) != runtime.config):
            log.info("model_file_followed", model=runtime.name, loaded=str(runtime.gguf.path),
                     on_disk=str(on_disk.path) if on_disk else None)
            await self.registry.unload(runtime.name, reason="was unloaded: its file changed on disk")

    def resolve(self, name: str) -> str:
        """The name a client means: Ollama's clients add a tag (`demo:latest` for `demo`) or leave out
        `:latest` (`llama3` for `llama3:latest`). A loaded model's name wins over one only on disk."""
        candidates = [name]
        if name.endswith(":latest"):
            candidates.append(name[:-len(":latest")])
        elif ":" not in name.rsplit("/", 1)[-1]:
            candidates.append(f"{name}:latest")
        for known in (self.registry.models, self.last.models):
            for candidate in candidates:
                if candidate in known:
                    return candidate
        return name

    def available(self) -> list[Available]:
        """On disk, not loaded, as of the last scan."""
        return [model for name, model in self.last.models.items() if name not in self.registry.models]

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
        if name not in self.last.models:
            await self.rescan()  # the scan in flight, or one just done: others asking for the name share it
            name = self.resolve(name)
            if name not in self.registry.models and name not in self.last.models:
                await self.rescan(fresh=True)  # still not there: a scan begun after this request, its turn come
                name = self.resolve(name)
        if name in self.registry.models or name not in self.last.models:
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
            task = self._background.keep(self._load(self.last.models[name], registered), f"load-{name}")
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
            self._tell_once("catalog_param_ignored", model=model.name, key=key, reason="not a setting this daemon takes")
        try:
            settings = {"path": str(model.path)}
            model_config(model.name, settings, defaults, host)  # [defaults] alone: its fault is not the store's
            for key, value in settings_of(model, defaults).items():
                try:
                    model_config(model.name, {**settings, key: value}, defaults, host)
                    settings[key] = value
                except ConfigError as e:
                    self._tell_once("catalog_param_ignored", model=model.name, key=key, reason=str(e))
            return model_config(model.name, settings, defaults, host)
        except ConfigError as e:  # [defaults] itself: a config without [models] tables never checked it
            raise precondition(f"model {model.name!r} cannot be loaded on demand: {e}") from None

    def _settings(self, model: Available) -> ModelConfig | None:
        try:
            return self.config_for(model)
        except ApiError:
            return None

    def _tell_once(self, event: str, **fields) -> None:
        """A warning about a model on disk, logged the first time only: listings ask again every time."""
        key = (event, *sorted(fields.items()))
        if key not in self._told:
            self._told.add(key)
            log.warning(event, **fields)

    async def listing(self) -> list[tuple[Available, GGUFInfo | None, ModelConfig | None]]:
        """Every model on disk not loaded, read afresh, with its header and settings where they can be had
        (a damaged file or a setting the config refuses: None; its load would say why)."""
        await self.rescan()
        available = self.available()
        headers = await asyncio.to_thread(self._read_headers, [model.path for model in available])
        listed = []
        for model in available:
            try:
                config = self.config_for(model)
            except ApiError:
                config = None
            listed.append((model, headers.get(model.path), config))
        return listed

    async def known(self) -> list[tuple[str, GGUFInfo]]:
        """Every model a request can name, with its header: the loaded ones, then those on disk (read
        afresh) — less any whose name a request would resolve to a loaded model instead."""
        loaded = [(runtime.name, runtime.gguf) for runtime in list(self.registry.models.values())]
        on_disk = [(model.name, header) for model, header, _ in await self.listing()
                   if header is not None and self.resolve(model.name) == model.name]
        return loaded + on_disk

    def _read_headers(self, paths: list) -> dict:
        """On a thread: each file's header, from the cache where the file has not changed; None for one
        that cannot be read (its load says why). The cache keeps only what is on disk now."""
        fresh, found = {}, {}
        for path in dict.fromkeys(paths):  # two tags of one blob: read once
            try:
                info = os.stat(path)
                key = (path, info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
                fresh[key] = found[path] = self._headers.get(key) or read_gguf_info(path)
            except (OSError, ApiError):
                found[path] = None
        self._headers = fresh
        return found

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


def missing(paths: dict) -> set:
    """On a thread: the names whose file is gone (one that cannot be looked at counts as there: its
    worker's mapping is what serves, and the scan reports the directory)."""
    gone = set()
    for name, path in paths.items():
        try:
            if not path.exists():
                gone.add(name)
        except OSError:
            pass
    return gone
