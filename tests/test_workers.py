"""Worker processes: limits, cancellation, crashes, retries, and never an orphan."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import ROOT, in_background, model_table, pid_alive, wait_for

SLOW = 'engine = "tests.engines:SlowEngine"'


def slow_model(**options) -> str:
    return model_table("tiny", "tiny.gguf", n_ctx=1024, engine="tests.engines:SlowEngine", **options)


def open_stream(daemon, max_tokens=500, prompt="hello"):
    return daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt=prompt,
                                                   options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0)))


def read_limits(pid: int) -> dict[str, tuple[str, str]]:
    limits = {}
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        for line in f:
            name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
            limits[name] = (soft, hard)
    return limits


def test_worker_runs_under_its_limits_in_its_own_process_group(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", rlimit_data="1GiB", rlimit_nofile=512))
    pid = daemon.worker("tiny").pid
    limits = read_limits(pid)
    assert limits["Max data size"] == (str(1 << 30), str(1 << 30))
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max open files"] == ("512", "512")
    status = open(f"/proc/{pid}/status").read()
    assert "NoNewPrivs:\t1" in status
    assert os.getpgid(pid) == pid  # its own group: a signal to the group reaches anything it spawned
    assert os.getsid(pid) == pid


def test_cancel_stops_generation_and_frees_the_worker(start_daemon):
    # 30 ms a token: the cancelled request would run 15 s if the worker did not stop it.
    daemon = start_daemon(slow_model(), env={"TEST_TOKEN_DELAY": "0.03"})
    stream = open_stream(daemon, max_tokens=500)
    next(stream)
    stream.cancel()
    started = time.monotonic()
    chunks = list(open_stream(daemon, max_tokens=3))
    assert chunks[-1].usage.completion_tokens == 3
    assert time.monotonic() - started < 5, "the next request waited for the cancelled one"


def test_worker_killed_mid_stream_gives_unavailable_with_the_signal(start_daemon):
    daemon = start_daemon(slow_model(), env={"TEST_TOKEN_DELAY": "0.03"})
    old_pid = daemon.worker("tiny").pid
    stream = open_stream(daemon, max_tokens=500)
    next(stream)
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SIGKILL" in caught.value.details() and str(old_pid) in caught.value.details()
    chunks = list(open_stream(daemon, max_tokens=3))
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].worker_pid != old_pid
    worker = daemon.worker("tiny")
    assert worker.restarts == 1 and "SIGKILL" in worker.last_exit


def test_request_not_started_is_retried_on_a_fresh_worker(start_daemon):
    # The worker sits 5 s before its first token: killed then, nothing has reached the client yet.
    daemon = start_daemon(slow_model(), env={"TEST_FIRST_TOKEN_DELAY": "5", "TEST_TOKEN_DELAY": "0"})
    old_pid = daemon.worker("tiny").pid
    result: dict = {}

    def request():
        try:
            result["chunks"] = list(open_stream(daemon, max_tokens=3))
        except grpc.RpcError as e:
            result["error"] = e

    thread = threading.Thread(target=request)
    thread.start()
    wait_for(lambda: daemon.worker("tiny").state == "BUSY", what="the request to reach the worker")
    os.kill(old_pid, signal.SIGKILL)
    thread.join(30)
    assert "error" not in result, result.get("error")
    assert result["chunks"][-1].usage.completion_tokens == 3
    assert result["chunks"][-1].worker_pid not in (0, old_pid)
    assert '"request_retried"' in daemon.log()


def test_a_crashed_worker_leaves_no_socket_or_heartbeat_file_behind(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256))
    (workers,) = daemon.run_dir.glob("workers-*")  # the daemon's private directory of worker sockets
    files = lambda: sorted(p.name for p in workers.iterdir())  # noqa: E731
    before = files()
    assert len(before) == 2  # one worker: its socket and its heartbeat file
    for _ in range(2):
        pid = daemon.worker("tiny").pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (w := daemon.worker("tiny")).state == "READY" and w.pid != pid, what="the restart")
    after = files()
    assert len(after) == 2 and not set(after) & set(before), (before, after)


def test_a_model_stopped_while_its_worker_is_being_killed_stays_stopped(start_daemon):
    # The worker is frozen (SIGSTOP): no progress past heartbeat_timeout, the supervisor sends TERM
    # (which a stopped process does not act on) and KILLs it 2 s later. `llmctl stop` lands in between:
    # the kill's exit must not start a worker for a model stopped by hand.
    daemon = start_daemon(slow_model(request_timeout="1s", heartbeat_timeout="1s"), env={"TEST_TOKEN_DELAY": "0.2"},
                          extra='poll_interval = "100ms"')
    pid = daemon.worker("tiny").pid
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(grpc.RpcError) as late:
        list(open_stream(daemon, max_tokens=50))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    daemon.stub.StopModel(pb.StopModelRequest(name="tiny"), timeout=30)
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the kill after the grace")
    deadline = time.monotonic() + 1.5  # a restart, were there one, spawns within a poll or two
    while time.monotonic() < deadline:
        worker = daemon.worker("tiny")
        assert worker.state == "STOPPED" and worker.pid == 0, worker
    with pytest.raises(grpc.RpcError) as refused:
        list(open_stream(daemon, max_tokens=1))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "STOPPED" in refused.value.details()


def test_no_worker_outlives_a_killed_supervisor(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf") + "\n" + model_table("other", "tiny.gguf"))
    pids = [w.pid for w in daemon.stub.Status(pb.StatusRequest()).workers]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="workers to die with the supervisor")


def test_sigterm_stops_workers_and_removes_the_socket(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"))
    pid = daemon.worker("tiny").pid
    socket_path = daemon.address.removeprefix("unix://")
    assert oct(os.stat(socket_path).st_mode & 0o777) == "0o660"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert not pid_alive(pid)
    assert not os.path.exists(socket_path)


def test_a_worker_that_cannot_load_leaves_the_supervisor_serving(start_daemon, model_dir):
    # A million-token context needs a 512 MiB KV cache; RLIMIT_DATA allows 256 MiB: llama.cpp's
    # allocation fails inside the worker, which says so and exits.
    daemon = start_daemon(model_table("tiny", "tiny.gguf") + "\n" +
                          model_table("starved", "tiny.gguf", rlimit_data="256MiB", n_ctx=1 << 20))
    starved = daemon.worker("starved")
    assert starved.state == "FATAL"
    assert "failed to load" in starved.last_exit and "status 3" in starved.last_exit
    assert "kv cache" in starved.last_exit  # llama.cpp's own reason, not just "failed"
    assert list(open_stream(daemon, max_tokens=2))[-1].usage.completion_tokens == 2


def test_full_queue_is_resource_exhausted_and_timeouts_are_deadline_exceeded(start_daemon):
    # parallel = 1: the one stream running fills the worker, so the next request would have to queue.
    daemon = start_daemon(slow_model(max_queue=0, request_timeout="1500ms", parallel=1), env={"TEST_TOKEN_DELAY": "0.03"})
    busy = open_stream(daemon, max_tokens=500)
    next(busy)
    with pytest.raises(grpc.RpcError) as caught:
        list(open_stream(daemon, max_tokens=2))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue = 0" in caught.value.details()
    # 500 tokens at 30 ms each would take 15 s; the model's request_timeout ends it after 1.5 s.
    with pytest.raises(grpc.RpcError) as caught:
        list(busy)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request_timeout (1.5 s)" in caught.value.details()
    # Its place is given back once the worker has freed the sequence (a step), and the worker serves on.
    wait_for(lambda: daemon.worker("tiny").state == "READY", 10, what="the timed-out sequence to be freed")
    assert list(open_stream(daemon, max_tokens=2))[-1].usage.completion_tokens == 2


def test_tokenize_during_a_generation_uses_the_busy_worker(start_daemon):
    daemon = start_daemon(slow_model(), env={"TEST_TOKEN_DELAY": "0.03"})
    pid = daemon.worker("tiny").pid
    stream = open_stream(daemon, max_tokens=60)
    next(stream)
    assert daemon.worker("tiny").state == "BUSY"
    during = daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello"))
    assert list(stream)[-1].usage.completion_tokens == 60
    assert daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello")).tokens == during.tokens
    # Still the one worker: a busy worker was not mistaken for a missing one.
    assert daemon.worker("tiny").pid == pid
    spares = set(daemon.stub.Status(pb.StatusRequest()).standby_pids)
    assert {c.pid for c in psutil.Process(daemon.proc.pid).children()} - spares == {pid}


def test_sigterm_during_a_start_up_load_stops_at_once_and_leaves_no_worker(model_dir):
    base = Path(tempfile.mkdtemp(prefix="llms-"))
    config = base / "config.toml"
    config.write_text(f'[supervisor]\naddress = "unix://{base}/s.sock"\nstate_dir = "{base}/state"\n'
                      f'runtime_dir = "{base}/run"\nmodel_dirs = ["{model_dir}"]\n'
                      + model_table("tiny", "tiny.gguf", engine="tests.engines:SlowEngine", load_timeout="5m"))
    log = base / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.server.daemon", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT), TEST_LOAD_DELAY="300"))
    try:
        spawned = wait_for(lambda: [json.loads(line) for line in log.read_text().splitlines()
                                    if '"worker_spawned"' in line], what="the worker to be loading")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 15  # not the 300 s the load would take
        assert not pid_alive(spawned[0]["worker_pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_sigterm_lets_queued_and_running_requests_finish_then_stops(start_daemon):
    daemon = start_daemon(slow_model(parallel=1), extra='shutdown_timeout = "30s"')  # one runs, one queues
    running, running_result = in_background(open_stream(daemon, max_tokens=60))
    wait_for(lambda: daemon.worker("tiny").state == "BUSY", what="the first request to run")
    queued, queued_result = in_background(open_stream(daemon, max_tokens=20))
    wait_for(lambda: daemon.worker("tiny").queue_depth == 1, what="the second request to queue")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: '"draining"' in daemon.log(), what="the daemon to stop taking calls")
    with pytest.raises(grpc.RpcError) as refused:  # nothing new is taken once it drains
        list(open_stream(daemon, max_tokens=2))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    running.join(30)
    queued.join(30)
    assert running_result["chunks"][-1].usage.completion_tokens == 60
    assert queued_result["chunks"][-1].usage.completion_tokens == 20
    assert daemon.proc.wait(30) == 0


def test_sigterm_ends_what_outlasts_shutdown_timeout_with_a_reason(start_daemon):
    daemon = start_daemon(slow_model(), extra='shutdown_timeout = "1s"', env={"TEST_TOKEN_DELAY": "0.03"})
    long, result = in_background(open_stream(daemon, max_tokens=500))  # 15 s of tokens
    wait_for(lambda: daemon.worker("tiny").state == "BUSY", what="the request to run")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    long.join(30)
    assert result["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down and shutdown_timeout (1 s) has passed" in result["error"].details()
    assert daemon.proc.wait(30) == 0
    assert time.monotonic() - started < 12  # not the 15 s the request wanted


def test_a_queued_request_whose_deadline_passes_leaves_the_queue_and_never_runs(start_daemon):
    daemon = start_daemon(slow_model(parallel=1), env={"TEST_TOKEN_DELAY": "0.03"})  # one runs, the next queues
    running, result = in_background(open_stream(daemon, max_tokens=100))  # 3 s of tokens
    wait_for(lambda: daemon.worker("tiny").state == "BUSY", what="the first request to run")
    late = daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="late", options=pb.SamplingOptions(max_tokens=2)),
                                timeout=0.5)
    with pytest.raises(grpc.RpcError) as expired:
        list(late)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: daemon.worker("tiny").queue_depth == 0, what="the expired request to leave the queue")
    assert running.is_alive() and daemon.worker("tiny").state == "BUSY"  # it left while the worker was busy
    running.join(30)
    assert result["chunks"][-1].usage.completion_tokens == 100
    assert list(open_stream(daemon, max_tokens=2))[-1].usage.completion_tokens == 2
