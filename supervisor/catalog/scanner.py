"""What the model directories hold (catalog.py's scan), read again when asked — at most once every
SCAN_EVERY_S, callers meanwhile sharing one scan — and what became of the loaded models' files since
they loaded; the GGUF headers a listing shows, cached while their files do not change."""

from __future__ import annotations

import asyncio
import os
import time

import structlog

from supervisor.catalog.catalog import Scan, scan
from supervisor.catalog.registry import Registry
from supervisor.errors import ApiError
from supervisor.settings.gguf_file import GGUFInfo, read_gguf_info
from supervisor.tasks import Background

log = structlog.get_logger("llm_supervisor.catalog")

SCAN_EVERY_S = 1.0  # clients listing, or asking for names that do not exist, cannot make the daemon scan nonstop


class Scanner:
    def __init__(self, registry: Registry, clock=time.monotonic) -> None:
        self.registry = registry
        self.last = Scan({})
        self.loaded_problems: tuple[str, ...] = ()  # loaded models whose file is gone or replaced, at the last scan
        self._clock = clock
        self._scan_began = -SCAN_EVERY_S
        self._scanning: asyncio.Task | None = None
        self._background = Background()  # a scan goes on for the others when the caller that began it goes
        self._reported: frozenset[str] = frozenset()
        self._told: set[tuple] = set()  # warnings about models on disk, each logged once
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
            self.tell_once("catalog_scan_failed", reason=f"{type(e).__name__}: {e}")
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

    def tell_once(self, event: str, **fields) -> None:
        """A warning about a model on disk, logged the first time only: listings ask again every time."""
        key = (event, *sorted(fields.items()))
        if key not in self._told:
            self._told.add(key)
            log.warning(event, **fields)

    async def headers(self, paths: list) -> dict:
        return await asyncio.to_thread(self._read_headers, paths)

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
