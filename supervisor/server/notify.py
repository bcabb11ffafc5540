"""Tells systemd how the daemon is doing (sd_notify through systemd-python): READY once it serves,
a one-line STATUS, WATCHDOG pings from the monitor loop, and STOPPING (RELOADING comes with SIGHUP). Without NOTIFY_SOCKET
— not started by systemd as Type=notify — every call is a no-op."""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

from systemd import daemon as sd_daemon


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds systemd allows between WATCHDOG=1 pings (WatchdogSec=), or None when it watches nothing.
    WATCHDOG_PID, when set, names the process meant: a child that inherited the variable is not it."""
    usec, target = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0 or (target and target != str(pid)):
        return None
    return int(usec) / 1e6


def ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def summary(states: Sequence[str], last_recycle: tuple[str, str, float] | None) -> str:
    """`systemctl status`'s one line: "3 models, 2 busy, last recycle: qwen leak 3m ago".
    `last_recycle` is (model, reason, seconds since)."""
    models = f"{len(states)} model{'' if len(states) == 1 else 's'}"
    parts = [models, f"{sum(s == 'BUSY' for s in states)} busy"]
    troubled = sum(s in ("FATAL", "BACKOFF") for s in states)
    if troubled:
        parts.append(f"{troubled} failing")
    if last_recycle is not None:
        model, reason, since = last_recycle
        short = reason if len(reason) <= 48 else reason[:47] + "…"
        parts.append(f"last recycle: {model} {short} {ago(since)}")
    return ", ".join(parts)


class Notifier:
    def __init__(self, env: Mapping[str, str], send: Callable[[str], bool] = sd_daemon.notify) -> None:
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval(env, os.getpid()) if self.enabled else None
        self._send = send
        self._status = ""

    def _notify(self, message: str) -> None:
        if self.enabled:
            self._send(message)

    def ready(self, status: str) -> None:
        self._status = status
        self._notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._status:  # one datagram per change, not per poll
            self._status = status
            self._notify(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_s:
            self._notify("WATCHDOG=1")

    def reloading(self) -> None:
        """RELOADING=1 until the next READY=1. MONOTONIC_USEC says when the reload began, as
        Type=notify-reload (systemd 253+) requires; Python's monotonic clock is CLOCK_MONOTONIC."""
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading the config")

    def stopping(self) -> None:
        self._notify("STOPPING=1\nSTATUS=draining requests and stopping workers")
