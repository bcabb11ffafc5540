"""Workers keep least privilege: no new privileges, no core dumps, nothing open but their own, no
way to reach the supervisor's API — which runs as the same user — or anything else, and no way into the
memory, environment or descriptors of the supervisor or of another worker."""

from __future__ import annotations

import errno
import os
import platform
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from worker import limits
from tests.conftest import Daemon, launch, model_table, wait_for

# Capabilities override dumpability: CAP_SYS_PTRACE for everything, and (seen on Linux 6.18)
# CAP_PERFMON or CAP_SYS_ADMIN for reading another process's environ and maps. Tests run as root, so a
# daemon runs here with none at all: as a user of its own would, which is what it is meant to run as.
WITHOUT_CAPABILITIES = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def probe_lines(daemon: Daemon) -> list[str]:
    lines = daemon.stub.TailModel(pb.TailModelRequest(name="tiny"))
    return [line.line for line in lines if line.line.startswith("probe:")]


def process_probe_lines(daemon: Daemon) -> list[str]:
    """The probe's lines after its connect(2) ones: see tests.engines.ProbingEngine."""
    return [line for line in probe_lines(daemon) if line.startswith(("probe: dumpable:", "probe: parent ",
                                                                     "probe: standby ", "probe: worker "))]


def test_a_worker_cannot_connect_anywhere_and_holds_nothing_else_open(model_dir):
    # A unix socket listening as the supervisor's does, which anyone of this user could connect to.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(tempfile.mkdtemp(prefix="llms-")) / "api.sock"
    listener.bind(str(path))
    listener.listen()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as outside:
        outside.connect(str(path))  # from outside a worker: reachable
    listener.accept()[0].close()
    tcp = socket.create_server(("127.0.0.1", 0))  # as a TCP API address would listen
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256, engine="tests.engines:ProbingEngine"),
                    env={"TEST_CONNECT_TO": str(path), "TEST_FASTOPEN_TO": "127.0.0.1:%d" % tcp.getsockname()[1]})
    try:
        pid = daemon.worker("tiny").pid
        status = proc_status(pid)
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # a filter is on
        with open(f"/proc/{pid}/limits") as f:
            core = next(line for line in f if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]  # no core dumps: they would hold prompts

        # What it has open: its heartbeat file, /dev/null, pipes to the supervisor, its sockets and the
        # kernel objects gRPC polls with — not the config, the state directory or another model's file.
        paths = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        files = {p for p in paths if p.startswith("/")}
        assert all(p == "/dev/null" or p.endswith(".beat") for p in files), files
        assert all(p.startswith(("/", "pipe:", "socket:", "anon_inode:")) for p in paths), paths

        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=1))))
        # Every way out the worker tries is refused by the filter (EPERM), not merely unsupported by this
        # kernel (ENOSYS, as x32 is where CONFIG_X86_X32_ABI is off): connect(2); connect(2) by its x32
        # number, which carries x86_64's audit arch; a ring whose IORING_OP_CONNECT would connect with no
        # connect(2) at all; and TCP fast open, whose sendto(2) connects and writes in one call.
        refused = "refused: Operation not permitted"
        expected = [f"probe: {refused}"] + [f"probe: x32 connect: {refused}"] * (platform.machine() == "x86_64") + [
            f"probe: io_uring_setup: {refused}", f"probe: fast open: {refused}"]
        lines = wait_for(lambda: len(probe_lines(daemon)) >= len(expected) and probe_lines(daemon),
                         what="the probe's lines")
        assert lines == expected, lines
        for server in (listener, tcp):  # and nothing reached either listener
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        daemon.stop()
        listener.close()
        tcp.close()


@pytest.fixture(scope="module")
def probed(model_dir) -> dict[str, str]:
    """What a worker found it could do to the supervisor and to the supervisor's other children — a spare
    and another model's worker — and whether it is dumpable: {"parent mem": "refused: ...", ...}."""
    models = "\n".join([model_table("tiny", "tiny.gguf", n_ctx=256, engine="tests.engines:ProbingEngine"),
                        model_table("other", "tiny.gguf", n_ctx=256)])
    daemon = launch(model_dir, models, env={"TEST_CONNECT_TO": "/nonexistent", "TEST_PROBE_PROCESSES": "1"},
                    prefix=WITHOUT_CAPABILITIES)
    try:
        assert int(proc_status(daemon.proc.pid)["CapEff"], 16) == 0
        spare = wait_for(lambda: daemon.stub.Status(pb.StatusRequest()).standby_pids, what="a spare")[0]
        # With the runtime imported the spare is long past its first line: it can be probed as it waits.
        wait_for(lambda: "libllama" in Path(f"/proc/{spare}/maps").read_text(), what="the spare's imports")
        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=1))))
        # Whether it is dumpable; then mem, environ and pidfd_getfd of the parent, the spare, the other worker.
        expected = 1 + 3 * 3
        lines = wait_for(lambda: len(found := process_probe_lines(daemon)) >= expected and found,
                         what="the probe's lines about processes")
        return dict(line.removeprefix("probe: ").split(": ", 1) for line in lines)
    finally:
        daemon.stop()


def test_a_worker_cannot_read_or_take_anything_from_another_worker(probed):
    # pidfd_getfd would hand over a copy of any descriptor (another worker's gRPC socket); mem is the
    # worker's memory, prompts and generated text included.
    refused = {"mem": "refused: Permission denied", "environ": "refused: Permission denied",
               "pidfd_getfd": "refused: Operation not permitted"}
    assert {key: outcome for key, outcome in probed.items() if key.startswith(("standby ", "worker "))} == {
        f"{sibling} {what}": outcome for sibling in ("standby", "worker other") for what, outcome in refused.items()}
    assert probed["dumpable"] == "0"  # the prober itself, a fresh worker as "other" is


def test_a_worker_cannot_read_or_take_anything_from_the_supervisor(probed):
    # The supervisor's listening API socket is among what pidfd_getfd would take.
    assert {key: outcome for key, outcome in probed.items() if key.startswith("parent ")} == {
        "parent mem": "refused: Permission denied", "parent environ": "refused: Permission denied",
        "parent pidfd_getfd": "refused: Operation not permitted"}


def run_filter(program: list, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """What the kernel's classic BPF would answer for struct seccomp_data (little-endian) — enough of it
    for the four instructions the filter uses, so the aarch64 filter is checked on any machine."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    pc = a = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == limits.RET_K:
            return k
        if code == limits.LD_W_ABS:
            a, pc = struct.unpack_from("<I", data, k)[0], pc + 1
        else:
            pc += 1 + (jt if (a == k if code == limits.JEQ_K else a & k) else jf)


@pytest.mark.parametrize("machine", sorted(limits.SYSCALLS))
def test_the_filter_refuses_connect_and_every_way_around_it_and_nothing_else(machine: str):
    calls = limits.SYSCALLS[machine]
    program = limits.connect_filter(calls)
    eperm = limits.RET_ERRNO | errno.EPERM
    assert run_filter(program, calls.connect, calls.arch) == eperm
    assert run_filter(program, calls.connect, 0x40000003) == limits.RET_KILL  # i386's calls: not ours to allow
    assert [run_filter(program, nr, calls.arch) for nr in (424, 425, 426, 427, 428)] == [
        limits.RET_ALLOW, eperm, eperm, eperm, limits.RET_ALLOW]
    x32_connect = run_filter(program, limits.X32_SYSCALL_BIT | calls.connect, calls.arch)
    assert x32_connect == (eperm if machine == "x86_64" else limits.RET_ALLOW)  # aarch64's kernel: ENOSYS
    for nr, flags_arg in calls.sends:  # gRPC's own sends pass MSG_NOSIGNAL
        fast_open = tuple(socket.MSG_FASTOPEN | socket.MSG_NOSIGNAL if i == flags_arg else 0 for i in range(6))
        plain = tuple(socket.MSG_NOSIGNAL if i == flags_arg else 0 for i in range(6))
        assert run_filter(program, nr, calls.arch, fast_open) == eperm
        assert run_filter(program, nr, calls.arch, plain) == limits.RET_ALLOW
    others = set(range(512)) - {calls.connect, *limits.IO_URING}
    assert {run_filter(program, nr, calls.arch) for nr in others} == {limits.RET_ALLOW}
