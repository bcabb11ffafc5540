"""Models by name, loaded or not: a request for a model on disk that is not loaded loads it (through
admission, which evicts idle models as for any start) while the request waits, when `load_on_demand` is
on. The disk is read again on a miss (at most once a second) and for every listing, so a file added or
removed is seen without a restart."""

from __future__ import annotations

import asyncio
import time

import structlog

from supervisor.catalog.catalog import Available, Scan, scan
from supervisor.catalog.registry import Registry
from supervisor.errors import ApiError, invalid
from supervisor.serving.runtime import ModelRuntime
from supervisor.settings.config import ConfigError, ModelConfig, model_config
from supervisor.settings.gguf_file import GGUFInfo, read_gguf_info
from supervisor.tasks import Background

log = structlog.get_logger("llm_supervisor.catalog")

MISS_RESCAN_S = 1.0  # a client asking for names that do not exist cannot make the daemon list directories nonstop


class OnDemand:
    def __init__(self, registry: Registry, clock=time.monotonic) -> None:
        self.registry = registry
        self.last = Scan({})
        self._clock = clock
        self._scanned_at = -MISS_RESCAN_S
        self._reported: frozenset[str] = frozenset()
        self._loading: dict[str, asyncio.Task] = {}
        self._background = Background()  # a load goes on for the others when the request that began it goes
        self._headers: dict[tuple, GGUFInfo] = {}  # by (path, size, mtime): a listing reads each file's once

    async def rescan(self) -> Scan:
        self._scanned_at = self._clock()
        self.last = await asyncio.to_thread(scan, self.registry.config.model_dirs)
        for problem in set(self.last.problems) - self._reported:  # each told once, not at every scan
            log.warning("catalog_skipped", reason=problem)
        self._reported = frozenset(self.last.problems)
        return self.last

    def resolve(self, name: str) -> str:
        """The name a client means: Ollama's clients add a tag (`demo:latest` for `demo`) or leave out
        `:latest` (`llama3` for `llama3:latest`)."""
        known = lambda n: n in self.registry.models or n in self.last.models  # noqa: E731
        if known(name):
            return name
        if name.endswith(":latest") and known(name[:-len(":latest")]):
            return name[:-len(":latest")]
        if ":" not in name.rsplit("/", 1)[-1] and known(f"{name}:latest"):
            return f"{name}:latest"
        return name

    def available(self) -> list[Available]:
        """On disk, not loaded, as of the last scan."""
        return [model for name, model in self.last.models.items() if name not in self.registry.models]

    async def runtime(self, name: str) -> ModelRuntime:
        """The model's runtime, loaded now if it is on disk and may be; NOT_FOUND otherwise."""
        name = self.resolve(name)
        if name in self.registry.models or not self.registry.config.load_on_demand:
            return self.registry.get(name)
        if name not in self.last.models and self._clock() - self._scanned_at >= MISS_RESCAN_S:
            await self.rescan()
            name = self.resolve(name)
        if name in self.registry.models or name not in self.last.models:
            return self.registry.get(name)
        task = self._loading.get(name)
        if task is None:  # one load for every request that asks meanwhile
            task = self._loading[name] = self._background.keep(self._load(self.last.models[name]), f"load-{name}")
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(task)

    def config_for(self, model: Available) -> ModelConfig:
        """Its settings: [models.NAME] if the config has the name, else [defaults], else its store's params."""
        configured = next((m for m in self.registry.config.models if m.name == model.name), None)
        try:
            defaults = self.registry.config.defaults
            return configured or model_config(model.name, {"path": str(model.path), **settings_of(model, defaults)},
                                              defaults, self.registry.host)
        except ConfigError as e:
            raise invalid(f"model {model.name!r} cannot be loaded on demand: {e}") from None

    async def listing(self) -> list[tuple[Available, GGUFInfo | None, ModelConfig | None]]:
        """Every model on disk not loaded, read afresh, with its header and settings where they can be had
        (a damaged file or a setting the config refuses: None; its load would say why)."""
        await self.rescan()
        headers: dict[tuple, GGUFInfo] = {}
        listed = []
        for model in self.available():
            try:
                stat = model.path.stat()
                key = (model.path, stat.st_size, stat.st_mtime_ns)
                header = self._headers.get(key) or await asyncio.to_thread(read_gguf_info, model.path)
                headers[key] = header
            except (OSError, ApiError):
                header = None
            try:
                config = self.config_for(model)
            except ApiError:
                config = None
            listed.append((model, header, config))
        self._headers = headers  # only what is on disk now: no cache of files long gone
        return listed

    async def _load(self, model: Available) -> ModelRuntime:
        config = self.config_for(model)
        started = self._clock()
        try:
            runtime = await self.registry.load(config, source="catalog")
        except ApiError as e:
            log.warning("load_on_demand_failed", model=model.name, path=str(model.path), reason=e.message)
            raise
        log.info("model_loaded", model=model.name, path=str(model.path), source="catalog", origin=model.source,
                 load_s=round(self._clock() - started, 3))
        return runtime


def settings_of(model: Available, defaults) -> dict:
    """What an Ollama params layer says of the runner and this daemon takes as the model's settings,
    where [defaults] does not say otherwise: its context length."""
    num_ctx = model.params.get("num_ctx")
    if "n_ctx" in defaults or not isinstance(num_ctx, int) or isinstance(num_ctx, bool):
        return {}
    return {"n_ctx": num_ctx}
