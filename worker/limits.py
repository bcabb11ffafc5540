"""What a worker does to itself first, before llama_cpp is imported: limits and its tie to the parent.

Done here rather than in a `preexec_fn`, which can deadlock in a threaded parent (the supervisor runs
gRPC threads). The supervisor starts us with start_new_session=True, so we lead our own process group.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Limits:
    data_bytes: int | None  # RLIMIT_DATA: private memory, mmap'd weights not counted
    nofile: int


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def tie_to_parent(parent_pid: int) -> None:
    """Die with SIGKILL when the supervisor dies, so no worker is ever orphaned."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died between fork and prctl: then the signal will never come.
    if os.getppid() != parent_pid:
        os._exit(70)


def apply_limits(limits: Limits) -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = limits.nofile if hard == resource.RLIM_INFINITY else min(limits.nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if limits.data_bytes is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.data_bytes, limits.data_bytes))
