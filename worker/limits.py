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
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
X32_SYSCALL_BIT = 0x40000000
MSG_FASTOPEN = 0x20000000
IO_URING = (425, 426, 427)  # io_uring_setup, _enter, _register: the same numbers on x86_64 and aarch64


@dataclass(frozen=True)
class Syscalls:
    """One machine's numbers, and the audit architecture the kernel reports with them."""

    arch: int
    seccomp: int
    connect: int
    sends: tuple[tuple[int, int], ...]  # (sendto, sendmsg, sendmmsg) numbers, each with its flags' argument
    x32: bool  # x86_64's x32 ABI: numbers with X32_SYSCALL_BIT, under x86_64's own audit arch


SYSCALLS = {
    "x86_64": Syscalls(0xC000003E, seccomp=317, connect=42, sends=((44, 3), (46, 2), (307, 3)), x32=True),
    "aarch64": Syscalls(0xC00000B7, seccomp=277, connect=203, sends=((206, 3), (211, 2), (269, 3)), x32=False),
}


@dataclass(frozen=True)
class Limits:
    data_bytes: int | None  # RLIMIT_DATA: private memory, mmap'd weights not counted
    nofile: int


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def forbid_ptrace() -> None:
    """No other process of our user may read or write our memory (/proc/PID/mem, process_vm_readv,
    ptrace), read our environment or list our descriptors (/proc/PID/environ, fd/), or take a copy of
    one (pidfd_getfd): on a process that is not dumpable all of these need CAP_SYS_PTRACE. Workers run
    as the supervisor's user, so without this any of them could read another's prompts or take the
    supervisor's listening API socket. /proc/PID/status and stat stay readable, and they are all the
    supervisor measures a worker by. execve makes a process dumpable again: each program (supervisor,
    worker, spare) calls this itself, first thing."""
    _prctl(PR_SET_DUMPABLE, 0)


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


# Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}, little-endian.
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
RET_ALLOW, RET_ERRNO, RET_KILL = 0x7FFF0000, 0x00050000, 0x80000000
Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k


def connect_filter(calls: Syscalls) -> list[Instruction]:
    """The filter forbid_connect installs. Another architecture's calls (a 32-bit binary) are refused
    wholesale; EPERM for connect, for every way around it the kernel offers — x32's numbers, which
    carry x86_64's own audit arch, io_uring (IORING_OP_CONNECT connects without connect(2)), and TCP
    fast open (sendto with MSG_FASTOPEN connects and writes in one call) — and for nothing else."""
    refuse = (RET_K, 0, 0, RET_ERRNO | errno.EPERM)
    program: list[Instruction] = [
        (LD_W_ABS, 0, 0, 4),                # A = arch
        (JEQ_K, 1, 0, calls.arch),          # our architecture: go on
        (RET_K, 0, 0, RET_KILL),
        (LD_W_ABS, 0, 0, 0),                # A = syscall number
    ]
    if calls.x32:
        program += [(JSET_K, 0, 1, X32_SYSCALL_BIT), refuse]
    for nr in (calls.connect, *IO_URING):
        program += [(JEQ_K, 0, 1, nr), refuse]
    for nr, flags_arg in calls.sends:
        program += [
            (JEQ_K, 0, 4, nr),              # not this call: on to the next
            (LD_W_ABS, 0, 0, 16 + 8 * flags_arg),  # A = the flags' low word
            (JSET_K, 0, 1, MSG_FASTOPEN),
            refuse,
            (RET_K, 0, 0, RET_ALLOW),
        ]
    return program + [(RET_K, 0, 0, RET_ALLOW)]


def forbid_connect() -> bool:
    """From now on a worker cannot open a connection: connect(2) and the ways around it fail with
    EPERM (see connect_filter). A worker serves its own socket and has no business opening
    connections — to the supervisor's API above all, which runs as the same user. A seccomp
    filter, allowed without privileges once no_new_privs is set, put on every thread at once (TSYNC:
    gRPC's threads already run) and inherited by any started later. Called after the model is loaded
    and the socket listens, so nothing a driver does at start-up is in its way. False on a machine
    whose syscall numbers are not known here."""
    calls = SYSCALLS.get(platform.machine())
    if calls is None:
        return False
    program = connect_filter(calls)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *f) for f in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.cast(filters, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(calls.seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_ulong(SECCOMP_FILTER_FLAG_TSYNC), ctypes.c_void_p(ctypes.addressof(fprog))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER) failed: {os.strerror(err)}")
    return True
