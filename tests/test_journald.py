"""Logs in a real journald: `/lib/systemd/systemd-journald` runs here without systemd as PID 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.server.logs import journal_entry, journal_field
from tests.conftest import model_table, wait_for

JOURNALD = "/lib/systemd/systemd-journald"
SOCKET = "/run/systemd/journal/socket"


def listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture(scope="session")
def journald():
    """The host's journald if one runs, else one started for the tests (and stopped after them)."""
    if listening(SOCKET):
        yield
        return
    if not os.path.exists(JOURNALD) or os.geteuid() != 0:
        pytest.skip("needs systemd-journald and root to start it")
    proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: listening(SOCKET), timeout=10, what="journald to listen")
    yield
    proc.terminate()
    proc.wait(10)


def journal(**match: str) -> list[dict]:
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *(f"{k}={v}" for k, v in match.items())],
                         capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_a_recycle_is_a_journald_entry_with_queryable_fields(start_daemon, journald):
    name = f"j{uuid.uuid4().hex[:8]}"  # this test's entries, among whatever else the journal holds
    daemon = start_daemon(model_table(name, "tiny.gguf", n_ctx=512),
                          extra='[logging]\njournald = true\nlevel = "debug"')
    old = next(w for w in daemon.stub.Status(pb.StatusRequest()).workers if w.model == name).pid
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name=name))
    (entry,) = wait_for(lambda: journal(MODEL=name, EVENT="worker_recycle"), what="the recycle in the journal")
    assert entry["SYSLOG_IDENTIFIER"] == "llm-supervisor" and entry["PRIORITY"] == "6"
    assert entry["WORKER_PID"] == str(old) and entry["REASON"].startswith("recycled by hand")
    assert entry["GRACEFUL"] == "true" and entry["REPLACEMENT"] == "first"
    assert entry["MESSAGE"].startswith(f"worker_recycle: model={name} worker_pid={old} reason=recycled by hand")
    # llama.cpp's own log, line by line, with the model's fields (at debug level: it says hundreds at load).
    lines = wait_for(lambda: journal(MODEL=name, EVENT="worker_output", WORKER_PID=str(old)), what="worker output")
    assert any("llama_model_loader" in e["LINE"] for e in lines) and lines[0]["PRIORITY"] == "7"


def test_a_figure_becomes_a_field_and_the_level_a_priority():
    entry = journal_entry({"event": "worker_recycle", "model": "qwen", "worker_pid": 42, "level": "warning",
                           "reason": "private memory 9.1 GiB is above the hard line", "private_memory_bytes": 9771000000,
                           "timestamp": "2026-11-25T00:00:00Z"}, "warning")
    assert entry["PRIVATE_MEMORY_BYTES"] == "9771000000" and entry["PRIORITY"] == "4"
    assert entry["MODEL"] == "qwen" and entry["WORKER_PID"] == "42" and "TIMESTAMP" not in entry
    assert journal_field("gpu-memory.bytes") == "GPU_MEMORY_BYTES" and journal_field("_x") == "X"
