"""What a changed config file means for the running daemon (`llmctl reread`, `update`, SIGHUP).

`plan` is pure: the models running now and the new config in, what to do out. supervisorctl's
reread/update shape: models the file added are loaded, models it no longer names are drained and
unloaded, changed ones get the new settings — a fresh worker (graceful recycle) only where the
change is baked into the worker process, at once otherwise. Models loaded through the API are the
API's, and a reload leaves them alone unless the file now names them too (then the file's wins, as at
start-up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from supervisor.settings.config import ModelConfig, SupervisorConfig

# Settings a worker process is started with: changing one takes a fresh worker.
WORKER_KEYS = frozenset({"path", "engine", "rlimit_data", "rlimit_nofile", "stream_interval",
                         *ModelConfig("", "").worker_options()})
# [supervisor]/[logging]/[metrics] settings bound when the daemon starts (sockets, directories, the log
# sink, the standby pool): a reload reports them as needing a restart and keeps the running values.
RESTART_KEYS = ("address", "state_dir", "runtime_dir", "standby_workers", "journald", "metrics_address", "insecure",
                "socket_group", "max_message_size", "max_concurrent_streams", "tls_cert", "tls_key", "tls_client_ca",
                "health_address", "http_address", "http_tls", "http_insecure", "cors_origins")
# Fields whose config key has another name.
KEY_NAMES = {"gpu_memory_budget_percent": "gpu_memory_budget"}
# The rest of SupervisorConfig takes effect at once.
LIVE_KEYS = tuple(f.name for f in dataclasses.fields(SupervisorConfig)
                  if f.name not in RESTART_KEYS and f.name not in ("defaults", "models"))


@dataclass(frozen=True)
class Change:
    """A model the file still names, with different settings."""

    config: ModelConfig
    keys: tuple[str, ...]  # what changed, sorted; "source" when the file takes over an API-loaded model
    new_worker: bool       # whether its worker must be replaced for the change to apply


@dataclass(frozen=True)
class Plan:
    added: tuple[ModelConfig, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[Change, ...] = ()
    live_keys: tuple[str, ...] = ()      # supervisor settings changed and applied at once
    restart_keys: tuple[str, ...] = ()   # supervisor settings changed that only a restart applies

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.live_keys or self.restart_keys)


def changed_keys(old: ModelConfig, new: ModelConfig) -> tuple[str, ...]:
    return tuple(sorted(f.name for f in dataclasses.fields(ModelConfig) if getattr(old, f.name) != getattr(new, f.name)))


def plan(running: Mapping[str, tuple[ModelConfig, str]], old: SupervisorConfig, new: SupervisorConfig) -> Plan:
    """`running`: name → (its config, its source: "config", "api" or "state")."""
    added, changed = [], []
    for model in new.models:
        if model.name not in running:
            added.append(model)
            continue
        current, source = running[model.name]
        keys = changed_keys(current, model)
        if source != "config":
            keys = ("source", *keys)
        if keys:
            changed.append(Change(model, keys, new_worker=bool(WORKER_KEYS.intersection(keys))))
    named = {m.name for m in new.models}
    removed = tuple(sorted(name for name, (_, source) in running.items() if source == "config" and name not in named))

    def differ(keys: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(k for k in keys if getattr(old, k) != getattr(new, k))

    live = tuple(dict.fromkeys(KEY_NAMES.get(k, k) for k in differ(LIVE_KEYS)))  # as the file spells them
    return Plan(tuple(added), removed, tuple(changed), live, differ(RESTART_KEYS))


def keep_bound(running: SupervisorConfig, new: SupervisorConfig) -> SupervisorConfig:
    """`new`, with the settings that need a restart left as the daemon is running them."""
    return dataclasses.replace(new, **{k: getattr(running, k) for k in RESTART_KEYS})
