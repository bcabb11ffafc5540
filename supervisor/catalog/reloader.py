"""Reloading the config at run time: `llmctl reread` shows, `llmctl update` and SIGHUP apply.

What to do is supervisor/catalog/reload_plan.py's pure plan; the registry carries it out.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from supervisor.settings.config import SupervisorConfig
from supervisor.server.logs import configure
from supervisor.server.notify import Notifier
from supervisor.catalog.registry import Registry
from supervisor.catalog.reload_plan import Plan, keep_bound, plan
from supervisor.server.security import AuthInterceptor, read_tokens

log = structlog.get_logger("llm_supervisor.reloader")


class Reloader:
    """`llmctl reread`/`update` and SIGHUP: read the config again, show or apply the difference.
    One at a time; a config that does not parse changes nothing (ConfigError says why)."""

    def __init__(self, registry: Registry, reread: Callable[[], SupervisorConfig], config_path: str,
                 notifier: Notifier, status: Callable[[], str], auth: AuthInterceptor | None = None) -> None:
        self.registry = registry
        self.reread = reread
        self.config_path = config_path
        self.notifier = notifier
        self.status = status  # the one-line STATUS= for systemd
        self.auth = auth
        self._lock = asyncio.Lock()

    async def reload(self, dry_run: bool) -> tuple[Plan, dict[str, str]]:
        """The plan, and what failed applying it (by model; empty for a dry run)."""
        async with self._lock:
            running = self.registry.config
            new = await asyncio.to_thread(self.reread)
            change = plan(self.registry.running(), running, new)
            tokens = await asyncio.to_thread(read_tokens, keep_bound(running, new))  # rotated tokens apply now
            if not dry_run and self.auth is not None:
                self.auth.tokens = tokens
            if dry_run or change.empty:
                return change, {}
            self.notifier.reloading()
            log.info("reloading", path=self.config_path, added=[m.name for m in change.added],
                     removed=list(change.removed), changed=[c.config.name for c in change.changed],
                     settings=list(change.live_keys))
            if change.restart_keys:
                log.warning("restart_needed", keys=list(change.restart_keys),
                            reason="bound when the daemon started: the running values stay until a restart")
            if "log_level" in change.live_keys:
                configure(new.log_level, journald=running.journald)
            errors = await self.registry.update(keep_bound(running, new), change)
            log.info("reloaded", failed=errors)
            self.notifier.ready(self.status())
            return change, errors
