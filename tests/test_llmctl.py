"""llmctl end to end: the real command against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import ROOT, model_table, pid_alive


def llmctl(daemon, *args, stdin: str = "", env_address: bool = False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if env_address:
        env["LLM_SUPERVISOR_ADDRESS"] = daemon.address
    else:
        args = ("--address", daemon.address, *args)
    return subprocess.run([sys.executable, "-m", "supervisor.ctl.main", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


def test_generate_prints_the_text_and_json_ends_with_usage(shared_daemon):
    plain = llmctl(shared_daemon, "generate", "tiny", "hello", "--max-tokens", "12", "--seed", "5", "--temperature", "0.7")
    assert plain.returncode == 0, plain.stderr
    lines = llmctl(shared_daemon, "--json", "generate", "tiny", "hello", "--max-tokens", "12", "--seed", "5",
                   "--temperature", "0.7").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert "usage" in objects[-1] and all("usage" not in o for o in objects[:-1])
    assert objects[-1]["usage"]["completion_tokens"] == 12
    assert objects[-1]["finish_reason"] == "length"
    assert plain.stdout == "".join(o["text"] for o in objects) + "\n"


def test_generate_follows_a_json_schema_file_and_status_shows_the_pool(shared_daemon, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    out = llmctl(shared_daemon, "generate", "tiny", "answer", "--max-tokens", "100", "--json-schema", str(schema))
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout)["ok"], bool)
    missing = llmctl(shared_daemon, "generate", "tiny", "answer", "--grammar", str(tmp_path / "none.gbnf"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr
    header, row = llmctl(shared_daemon, "status").stdout.splitlines()[:2]
    seqs, kv, cached, preempted = row[header.index("SEQS"):].split()[:4]  # the table's columns are aligned
    assert seqs == "0/4" and kv.endswith("/512") and int(kv.split("/")[0]) > 0
    assert 1 <= int(cached) <= 4 and preempted == "0"


def test_status_and_models_tables_and_json(shared_daemon):
    table = llmctl(shared_daemon, "status", env_address=True)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["MODEL", "STATE", "PID", "PRIVATE"]
    assert row.split()[:2] == ["tiny", "READY"]
    assert "CPU" in header.split() and "TEMP" in header.split()
    (status,) = [json.loads(line) for line in llmctl(shared_daemon, "--json", "status").stdout.splitlines()]
    assert status["model"] == "tiny" and int(status["private_memory_bytes"]) > 0
    models = llmctl(shared_daemon, "models").stdout
    assert "tiny" in models and "llama" in models


def test_chat_keeps_the_history(shared_daemon):
    result = llmctl(shared_daemon, "--json", "chat", "tiny", "--max-tokens", "4", "--system", "terse",
                    stdin="first question\nsecond question\n")
    assert result.returncode == 0, result.stderr
    finals = [o for o in map(json.loads, result.stdout.splitlines()) if "usage" in o]
    assert len(finals) == 2
    # The second turn's prompt holds the first question and answer too.
    assert finals[1]["usage"]["prompt_tokens"] > finals[0]["usage"]["prompt_tokens"] + 4


def test_errors_exit_non_zero_with_the_servers_message(shared_daemon, tmp_path):
    missing = llmctl(shared_daemon, "generate", "nope", "hi")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr and "unknown model 'nope'" in missing.stderr
    bad = llmctl(shared_daemon, "load", "x", "--path", "tiny.gguf", "--option", "n_ctx")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    nobody = subprocess.run([sys.executable, "-m", "supervisor.ctl.main", "--address", f"unix://{tmp_path}/none.sock",
                             "status"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert nobody.returncode == 1 and "cannot reach llm-supervisord" in nobody.stderr


def test_stop_keeps_the_model_stopped_until_start(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256))
    pid = daemon.worker("tiny").pid
    stopped = llmctl(daemon, "stop", "tiny")
    assert stopped.returncode == 0 and f"tiny: stopped (worker pid {pid})" in stopped.stdout
    assert not pid_alive(pid)
    row = llmctl(daemon, "status", "tiny").stdout.splitlines()[1].split()
    assert row[:3] == ["tiny", "STOPPED", "-"]
    refused = llmctl(daemon, "generate", "tiny", "hi", "--max-tokens", "2")
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr and "STOPPED" in refused.stderr and "llmctl start tiny" in refused.stderr
    started = llmctl(daemon, "--json", "start", "tiny")
    assert started.returncode == 0, started.stderr
    reply = json.loads(started.stdout)
    assert reply["already_running"] is False and reply["pid"] not in (0, pid)
    assert llmctl(daemon, "generate", "tiny", "hi", "--max-tokens", "2").returncode == 0
    assert "already running" in llmctl(daemon, "start", "tiny").stdout
    assert "NOT_FOUND" in llmctl(daemon, "stop", "nope").stderr


def test_tail_shows_the_workers_own_output_and_follows_new_lines(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256))
    pid = daemon.worker("tiny").pid
    kept = llmctl(daemon, "--json", "tail", "tiny", "-n", "0")
    lines = [json.loads(line) for line in kept.stdout.splitlines()]
    assert len(lines) > 20 and {line["worker_pid"] for line in lines} == {pid}
    assert any("llama" in line["line"] for line in lines)  # llama.cpp's own load log
    last = llmctl(daemon, "tail", "tiny", "-n", "5").stdout.splitlines()
    assert len(last) == 5 and all(f"[{pid}]" in line for line in last)

    # Follow: a recycle brings a new worker, whose load log must stream in.
    follower = subprocess.Popen([sys.executable, "-m", "supervisor.ctl.main", "--address", daemon.address, "--json",
                                 "tail", "tiny", "-n", "1", "-f"], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert json.loads(follower.stdout.readline())["worker_pid"] == pid  # the one kept line first
        new_pid = daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny")).new_pid
        assert json.loads(follower.stdout.readline())["worker_pid"] == new_pid
    finally:
        follower.terminate()
        follower.wait(10)


def test_top_refreshes_with_tokens_per_second_and_health_says_serving(shared_daemon):
    llmctl(shared_daemon, "generate", "tiny", "hello", "--max-tokens", "8")
    top = llmctl(shared_daemon, "--json", "top", "--interval", "0.1", "--iterations", "2")
    assert top.returncode == 0, top.stderr
    frames = [json.loads(line) for line in top.stdout.splitlines()]
    assert len(frames) == 2 and frames[1]["time_unix"] > frames[0]["time_unix"]
    (worker,) = frames[-1]["workers"]
    assert worker["model"] == "tiny" and worker["tokens_per_second"] > 0
    table = llmctl(shared_daemon, "top", "--iterations", "1").stdout
    assert "TOK/S" in table.splitlines()[1] and "\x1b[2J" not in table  # no screen clearing into a pipe
    health = llmctl(shared_daemon, "health")
    assert health.returncode == 0, health.stdout
    assert [line.split() for line in health.stdout.splitlines()[1:]] == [["(overall)", "SERVING"], ["model/tiny", "SERVING"]]
    assert llmctl(shared_daemon, "health", "nope").returncode == 1


def test_interactive_shell_through_a_terminal(shared_daemon):
    import pty
    import select

    parent, child = pty.openpty()
    shell = subprocess.Popen([sys.executable, "-m", "supervisor.ctl.main", "--address", shared_daemon.address],
                             stdin=child, stdout=child, stderr=child, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             start_new_session=True)
    os.close(child)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30.0) -> bytes:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            ready, _, _ = select.select([parent], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {marker!r} from the shell; it said: {seen.decode(errors='replace')}"
            seen += os.read(parent, 4096)
        before, _, seen = seen.partition(marker)
        return before

    try:
        read_until(b"llmctl> ")
        os.write(parent, b"status\n")
        assert b"READY" in read_until(b"llmctl> ")
        os.write(parent, b"generate nope hi\n")
        assert b"NOT_FOUND" in read_until(b"llmctl> ")  # an error is printed; the shell goes on
        os.write(parent, b"bogus\n")
        assert b"invalid choice" in read_until(b"llmctl> ")
        os.write(parent, b"--json health tiny\n")
        assert b'"status": "SERVING"' in read_until(b"llmctl> ")
        os.write(parent, b"exit\n")
        assert shell.wait(10) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
        os.close(parent)
