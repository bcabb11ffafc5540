"""Engines for tests, plugged in through the `engine` config key like any other backend.

They wrap the real llama.cpp engine and only add delays (per request before it enters the batch, per
decode step after), so a test can catch a worker mid-stream
(kill it, cancel it) without racing a model that generates thousands of tokens a second; ProbingEngine
also tries, from inside a worker, the ways out that the worker's seccomp filter must close, and the
ptrace-class ways into the supervisor and the other workers that being undumpable must close.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import socket
import struct
import time
from typing import Sequence

from worker.embedding import LlamaEmbedder
from worker.engine import Chunk, LlamaEngine
from worker.generation import Sampling


class SlowEngine(LlamaEngine):
    """Seconds to load, before the first token and between tokens come from the worker's environment."""

    def load(self, path: str, options: dict):
        time.sleep(float(os.environ.get("TEST_LOAD_DELAY", "0")))
        return super().load(path, options)

    def sampler(self, sampling: Sampling):
        time.sleep(float(os.environ.get("TEST_FIRST_TOKEN_DELAY", "0")))  # on the request's own thread
        return super().sampler(sampling)

    def decode(self, chunks: Sequence[Chunk]) -> None:
        super().decode(chunks)
        time.sleep(float(os.environ.get("TEST_TOKEN_DELAY", "0.02")))


class SlowEmbedder(LlamaEmbedder):
    """llama.cpp's embedder, TEST_EMBED_DELAY seconds slower per input (after it, so the heartbeat stamped
    before the input is all that proves progress meanwhile)."""

    def embed(self, tokens: Sequence[int]) -> list[float]:
        vector = super().embed(tokens)
        time.sleep(float(os.environ.get("TEST_EMBED_DELAY", "0")))
        return vector


MiB = 1 << 20


class LeakyEngine(SlowEngine):
    """Leaks TEST_LEAK_MIB after each request, or TEST_LEAK_MIB_PER_TOKEN during generation: memory
    that stays referenced and written, so it is resident private memory, as a real leak is."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: list[bytes] = []

    def decode(self, chunks: Sequence[Chunk]) -> None:
        per_token = int(float(os.environ.get("TEST_LEAK_MIB_PER_TOKEN", "0")) * MiB)
        super().decode(chunks)
        if per_token:
            self._kept.append(b"\x01" * per_token * sum(chunk.logits for chunk in chunks))

    def after_request(self) -> None:
        per_request = int(float(os.environ.get("TEST_LEAK_MIB", "0")) * MiB)
        if per_request:
            self._kept.append(b"\x01" * per_request)
        super().after_request()


def _sockaddr(target: str) -> tuple[int, bytes]:
    """(family, struct sockaddr) for a unix socket path or host:port, for raw syscalls that take one."""
    if target.startswith("/"):
        return socket.AF_UNIX, struct.pack("=H", socket.AF_UNIX) + target.encode() + b"\0"
    host, port = target.rsplit(":", 1)
    return socket.AF_INET, struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(port)) + socket.inet_aton(host) \
        + bytes(8)


def _syscall(number: int, *args: int | ctypes.Array | None) -> tuple[int, int]:
    """(result, errno) of a raw syscall, bypassing whatever libc would have called instead."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    return result, ctypes.get_errno()


def _outcome(result: int, err: int) -> str:
    return "connected" if result == 0 else f"refused: {os.strerror(err)}"


def probe_x32_connect(target: str) -> str:
    """connect(2) by its x32 number (__X32_SYSCALL_BIT | 42): same audit arch as x86_64's, another number."""
    family, address = _sockaddr(target)
    buffer = ctypes.create_string_buffer(address, len(address))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        return _outcome(*_syscall(0x40000000 | 42, s.fileno(), buffer, len(address)))


IO_URING_SETUP, IO_URING_ENTER = 425, 426  # the same numbers on x86_64 and aarch64
IORING_OP_CONNECT, IORING_ENTER_GETEVENTS = 16, 1
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000


def probe_io_uring_connect(target: str) -> str:
    """A connection made by the kernel for an IORING_OP_CONNECT entry: connect(2) itself is never called.
    Says "io_uring_setup: refused: ..." when no ring can be made at all."""
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    ring, err = _syscall(IO_URING_SETUP, 1, params)
    if ring < 0:
        return f"io_uring_setup: refused: {os.strerror(err)}"
    family, address = _sockaddr(target)
    buffer = ctypes.create_string_buffer(address, len(address))
    maps: list[mmap.mmap] = []
    try:
        sq_entries, cq_entries = struct.unpack_from("=II", params, 0)
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("=7I", params, 40)
        cq_head, _, cq_mask, _, _, cqes = struct.unpack_from("=6I", params, 80)

        def mapped(size: int, offset: int) -> mmap.mmap:
            maps.append(mmap.mmap(ring, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset))
            return maps[-1]

        sq = mapped(sq_array + 4 * sq_entries, IORING_OFF_SQ_RING)
        cq = mapped(cqes + 16 * cq_entries, IORING_OFF_CQ_RING)
        sqes = mapped(64 * sq_entries, IORING_OFF_SQES)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # struct io_uring_sqe: opcode, flags, ioprio, fd, off (= addrlen for CONNECT), addr, ...
            struct.pack_into("=BBHiQQ40x", sqes, 0, IORING_OP_CONNECT, 0, 0, s.fileno(), len(address),
                             ctypes.addressof(buffer))
            (tail,) = struct.unpack_from("=I", sq, sq_tail)
            struct.pack_into("=I", sq, sq_array + 4 * (tail & sq_mask), 0)
            struct.pack_into("=I", sq, sq_tail, tail + 1)
            entered, err = _syscall(IO_URING_ENTER, ring, 1, 1, IORING_ENTER_GETEVENTS, None, 0)
            if entered < 0:
                return f"io_uring_enter: refused: {os.strerror(err)}"
            (head,) = struct.unpack_from("=I", cq, cq_head)
            _, res, _ = struct.unpack_from("=QiI", cq, cqes + 16 * (head & cq_mask))
            return "io_uring connect: " + _outcome(res, -res)
    finally:
        for m in maps:
            m.close()
        os.close(ring)


def probe_fastopen(target: str) -> str:
    """sendto(2) with MSG_FASTOPEN: TCP's connect and first write in one call, connect(2) never called."""
    host, port = target.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.sendto(b"probe", socket.MSG_FASTOPEN, (host, int(port)))
            return "connected"
        except OSError as e:
            return f"refused: {os.strerror(e.errno)}"


PIDFD_GETFD = 438  # the same number on x86_64 and aarch64
PR_GET_DUMPABLE = 3


def probe_mem(pid: int) -> str:
    """Open /proc/PID/mem for reading and writing: the process's whole memory, prompts and all."""
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))
        return "opened"
    except OSError as e:
        return f"refused: {os.strerror(e.errno)}"


def probe_environ(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"read {len(f.read())} bytes"
    except OSError as e:
        return f"refused: {os.strerror(e.errno)}"


def probe_pidfd_getfd(pid: int) -> str:
    """Copies of the process's open descriptors, taken by pidfd_getfd(2) — a listening socket among them
    is a way to serve (or answer) its clients."""
    pidfd = os.pidfd_open(pid)
    taken: list[str] = []
    try:
        for target in range(256):
            fd, err = _syscall(PIDFD_GETFD, pidfd, target, 0)
            if fd < 0 and err != errno.EBADF:  # EBADF: nothing open there
                return f"refused: {os.strerror(err)}"
            if fd >= 0:
                taken.append(os.readlink(f"/proc/self/fd/{fd}"))
                os.close(fd)
    finally:
        os.close(pidfd)
    sockets = sum(p.startswith("socket:") for p in taken)
    return f"took {len(taken)} descriptors, {sockets} of them sockets"


def probe_process(pid: int) -> list[str]:
    return [f"mem: {probe_mem(pid)}", f"environ: {probe_environ(pid)}", f"pidfd_getfd: {probe_pidfd_getfd(pid)}"]


def siblings() -> list[tuple[str, int]]:
    """The parent's other children, named for what they are and in that order: "standby" for a spare
    (one that became a worker keeps that command line), "worker NAME" for a model's worker."""
    me, parent = os.getpid(), os.getppid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:  # stat and cmdline stay readable on an undumpable process: ps reads them
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
        except (OSError, ValueError):  # gone meanwhile
            continue
        if ppid == parent:
            found.append((child_name(args), int(entry)))
    return sorted(found)


def child_name(args: list[str]) -> str:
    if "--standby" in args:
        return "standby"
    return f"worker {args[args.index('--name') + 1]}" if "--name" in args[:-1] else "other " + " ".join(args)


class ProbingEngine(LlamaEngine):
    """Tries, at each request, to connect where TEST_CONNECT_TO says (a unix socket path, or host:port)
    and says on stderr how that went: what a compromised worker could reach. The first "probe:" line is
    connect(2)'s; then the same target by x32's connect (on x86_64 only) and by io_uring, and, where
    TEST_FASTOPEN_TO names a host:port, TCP fast open there. Where TEST_PROBE_PROCESSES is set, the
    lines after those say whether the worker is dumpable, and what it could read or take from the
    supervisor ("probe: parent mem: ...", then environ and pidfd_getfd) and from each of the supervisor's
    other children ("probe: standby mem: ...", "probe: worker NAME mem: ...")."""

    def sampler(self, sampling: Sampling):
        import sys

        target = os.environ["TEST_CONNECT_TO"]
        family = socket.AF_UNIX if target.startswith("/") else socket.AF_INET
        address = target if family == socket.AF_UNIX else (target.rsplit(":", 1)[0], int(target.rsplit(":", 1)[1]))
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                print("probe: connected", file=sys.stderr, flush=True)
            except OSError as e:
                print(f"probe: refused: {os.strerror(e.errno)}", file=sys.stderr, flush=True)
        if platform.machine() == "x86_64":
            print(f"probe: x32 connect: {probe_x32_connect(target)}", file=sys.stderr, flush=True)
        print(f"probe: {probe_io_uring_connect(target)}", file=sys.stderr, flush=True)
        if fastopen := os.environ.get("TEST_FASTOPEN_TO"):
            print(f"probe: fast open: {probe_fastopen(fastopen)}", file=sys.stderr, flush=True)
        if os.environ.get("TEST_PROBE_PROCESSES"):
            dumpable = ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
            print(f"probe: dumpable: {dumpable}", file=sys.stderr, flush=True)
            for name, pid in [("parent", os.getppid()), *siblings()]:
                for line in probe_process(pid):
                    print(f"probe: {name} {line}", file=sys.stderr, flush=True)
        return super().sampler(sampling)
