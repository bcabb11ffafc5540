"""Workers keep least privilege: no new privileges, no core dumps, nothing open but their own, and no
way to reach the supervisor's API — which runs as the same user — or anything else."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import launch, model_table, wait_for


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_a_worker_cannot_connect_anywhere_and_holds_nothing_else_open(model_dir):
    # A unix socket listening as the supervisor's does, which anyone of this user could connect to.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(tempfile.mkdtemp(prefix="llms-")) / "api.sock"
    listener.bind(str(path))
    listener.listen()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as outside:
        outside.connect(str(path))  # from outside a worker: reachable
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256, engine="tests.engines:ProbingEngine"),
                    env={"TEST_CONNECT_TO": str(path)})
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
        lines = wait_for(lambda: [line.line for line in daemon.stub.TailModel(pb.TailModelRequest(name="tiny"))
                                  if line.line.startswith("probe:")], what="the probe's line")
        assert lines == ["probe: refused: Operation not permitted"]
    finally:
        daemon.stop()
        listener.close()
