"""Reads of /proc/PID/status: what a worker owns privately versus the shared, file-backed weights, and
the capabilities a process has."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySample:
    rss_anon: int
    rss_file: int
    swap: int
    data: int = 0  # VmData: the virtual size RLIMIT_DATA limits (heap, anonymous mappings; touched or not)

    @property
    def private(self) -> int:
        # What a leak grows; mmap'd weights are file pages (RssFile), shared and reclaimable.
        return self.rss_anon + self.swap


def read_memory(pid: int, proc: str = "/proc") -> MemorySample | None:
    """None when the process is gone (a normal race, not an error)."""
    values: dict[str, int] = {}
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmSwap", "VmData"):
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return MemorySample(values.get("RssAnon", 0), values.get("RssFile", 0), values.get("VmSwap", 0),
                        values.get("VmData", 0))


CAP_IPC_LOCK = 14


def has_capability(bit: int, pid: str = "self", proc: str = "/proc") -> bool:
    """Whether the process's effective capability set (CapEff) holds capability number `bit`."""
    with open(f"{proc}/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False
