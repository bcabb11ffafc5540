"""What a worker does to itself first, before llama_cpp is imported: limits and its tie to the parent.

Done here rather than in a `preexec_fn`, which can deadlock in a threaded parent (the supervisor runs
gRPC threads). The supervisor starts us with start_new_session=True, so we lead our own process group.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import struct
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
# Per machine: connect(2)'s number, seccomp(2)'s, and the audit architecture the kernel reports.
SYSCALLS = {"x86_64": (42, 317, 0xC000003E), "aarch64": (203, 277, 0xC00000B7)}


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


def forbid_connect() -> bool:
    """From now on connect(2) fails with EPERM: a worker serves its own socket and has no business
    opening connections — to the supervisor's API above all, which runs as the same user. A seccomp
    filter, allowed without privileges once no_new_privs is set, put on every thread at once (TSYNC:
    gRPC's threads already run) and inherited by any started later. Called after the model is loaded
    and the socket listens, so nothing a driver does at start-up is in its way. False on a machine
    whose syscall numbers are not known here."""
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        return False
    nr, seccomp, arch = numbers
    # Classic BPF over struct seccomp_data {int nr; u32 arch; ...}: another architecture's calls (a
    # 32-bit binary) are refused wholesale; connect gets EPERM; everything else is allowed.
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    ret_allow, ret_errno, ret_kill = 0x7FFF0000, 0x00050000, 0x80000000
    program = [
        (ld_w_abs, 0, 0, 4),              # A = arch
        (jeq_k, 1, 0, arch),              # our architecture: go on
        (ret_k, 0, 0, ret_kill),
        (ld_w_abs, 0, 0, 0),              # A = syscall number
        (jeq_k, 0, 1, nr),
        (ret_k, 0, 0, ret_errno | errno.EPERM),
        (ret_k, 0, 0, ret_allow),
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *f) for f in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.cast(filters, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_ulong(SECCOMP_FILTER_FLAG_TSYNC), ctypes.c_void_p(ctypes.addressof(fprog))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER) failed: {os.strerror(err)}")
    return True
