"""The watchdog with real workers: leaks recycled before they cost the machine, crashes backed off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import ROOT, model_table, pid_alive, wait_for
from tests.test_llmctl import llmctl

MiB = 1 << 20



def leaky(**options) -> str:
    return model_table("tiny", "tiny.gguf", n_ctx=512, engine="tests.engines:LeakyEngine", **options)


def ask(daemon, max_tokens=4):
    return list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                        options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0))))


def test_a_leak_is_recycled_before_it_reaches_the_limit_and_no_request_fails(start_daemon):
    daemon = start_daemon(leaky(max_private_memory="200MiB", leak_threshold="100MiB"),
                          env={"TEST_LEAK_MIB": "8", "TEST_TOKEN_DELAY": "0.002"}, extra="poll_interval = \"100ms\"")
    first_pid = daemon.worker("tiny").pid
    failures: list[Exception] = []
    peak = [0]
    done = threading.Event()

    def client():
        for _ in range(20):
            try:
                assert ask(daemon)[-1].usage.completion_tokens == 4
            except Exception as e:  # noqa: BLE001 — every failure counts, whatever its kind
                failures.append(e)

    def watch_memory():
        while not done.is_set():
            peak[0] = max(peak[0], daemon.worker("tiny").private_memory_bytes)

    clients = [threading.Thread(target=client) for _ in range(3)]
    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    done.set()
    watcher.join()

    assert not failures, failures[:3]
    worker = daemon.worker("tiny")
    assert worker.recycles >= 1
    assert "MiB/request" in worker.last_recycle_reason  # the trend caught it, not the memory line
    assert worker.pid != first_pid and not pid_alive(first_pid)
    assert 0 < peak[0] < 200 * MiB  # 60 requests × 8 MiB would have been 480 MiB more
    assert '"graceful": true' in daemon.log() and '"bytes_per_request"' in daemon.log()


def test_the_hard_line_kills_mid_request_and_says_why(start_daemon):
    daemon = start_daemon(leaky(max_private_memory="100MiB", hard_memory_factor=1.2),
                          env={"TEST_LEAK_MIB_PER_TOKEN": "4", "TEST_TOKEN_DELAY": "0.02"},
                          extra="poll_interval = \"100ms\"")
    old = daemon.worker("tiny").pid
    with pytest.raises(grpc.RpcError) as caught:
        ask(daemon, max_tokens=400)  # 4 MiB a token: 1.6 GiB if nobody stopped it
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "killed by the supervisor: private memory" in caught.value.details()
    assert "hard line 120.0 MiB" in caught.value.details()
    wait_for(lambda: daemon.worker("tiny").state == "READY", what="the replacement")
    worker = daemon.worker("tiny")
    assert worker.pid != old and worker.recycles == 1 and worker.restarts == 0


def test_a_line_below_what_a_fresh_worker_holds_ends_fatal_instead_of_looping(start_daemon):
    # Every loaded worker holds ~40 MiB: each replacement would cross the hard line (30 MiB) as it starts.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", max_private_memory="20MiB", max_restarts=2),
                          extra='poll_interval = "100ms"')
    worker = wait_for(lambda: (w := daemon.worker("tiny")).state == "FATAL" and w, timeout=60, what="FATAL")
    assert "hard line 30.0 MiB" in worker.last_exit and "3 times in a row" in worker.last_exit
    assert worker.recycles == 3 and worker.restarts == 3  # no soft-line recycles: the line is below the baseline


def test_a_soft_line_between_a_fresh_worker_and_its_hard_line_does_not_recycle_it_forever(start_daemon):
    # ~40 MiB at load: above the soft line (30 MiB), below the hard one (45 MiB). Recycling it would
    # replace it with another just like it, every two polls, for ever.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", max_private_memory="30MiB"), extra='poll_interval = "100ms"')
    pid = daemon.worker("tiny").pid
    assert ask(daemon)[-1].worker_pid == pid
    deadline = time.monotonic() + 1.0  # ten polls: a recycle, were there one, would have been decided
    while time.monotonic() < deadline:
        assert daemon.worker("tiny").recycles == 0


def test_a_worker_killed_five_times_in_a_row_ends_fatal_with_the_reason(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", max_restarts=4))
    killed = set()
    for _ in range(5):
        pid = wait_for(lambda: (w := daemon.worker("tiny")).state == "READY" and w.pid not in killed and w.pid,
                       what="a fresh worker")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    worker = wait_for(lambda: (w := daemon.worker("tiny")).state == "FATAL" and w, what="FATAL")
    assert "died 5 times in a row" in worker.last_exit and "SIGKILL" in worker.last_exit
    assert worker.restarts == 5
    with pytest.raises(grpc.RpcError) as caught:
        ask(daemon)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "FATAL" in caught.value.details()
    assert '"new": "BACKOFF"' in daemon.log()  # restarts waited 1, 2, 4 s


def test_recycle_and_restart_by_hand(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"))
    first = daemon.worker("tiny").pid
    result = llmctl(daemon, "recycle", "tiny")
    assert result.returncode == 0, result.stderr
    second = daemon.worker("tiny")
    assert f"worker {first} replaced by {second.pid}" in result.stdout
    assert second.recycles == 1 and "by hand" in second.last_recycle_reason
    wait_for(lambda: not pid_alive(first), timeout=15, what="the old worker to retire after its drain")
    result = llmctl(daemon, "--json", "restart", "tiny")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: daemon.worker("tiny").state == "READY", what="the restarted worker")
    assert daemon.worker("tiny").pid not in (first, second.pid)
    assert ask(daemon)[-1].usage.completion_tokens == 4


def standby_pids(daemon) -> list[int]:
    return list(daemon.stub.Status(pb.StatusRequest()).standby_pids)


def test_a_recycle_takes_the_standby_process_and_a_new_spare_follows(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"))
    spare = wait_for(lambda: standby_pids(daemon), what="a standby process")[0]
    old = daemon.worker("tiny").pid
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny"))
    fresh = daemon.worker("tiny")
    assert fresh.pid == spare and fresh.state == "READY"
    assert ask(daemon)[-1].usage.completion_tokens == 4
    refill = wait_for(lambda: [p for p in standby_pids(daemon) if p != spare], what="a new spare")
    assert old not in refill and pid_alive(refill[0])
    spares = standby_pids_seen(daemon)  # the log goes with the daemon's directory
    assert refill[0] in spares
    daemon.stop()
    assert not any(pid_alive(p) for p in spares), "a spare outlived the daemon"


def standby_pids_seen(daemon) -> list[int]:
    """Spare pids the daemon logged: none may outlive it."""
    return [json.loads(line)["worker_pid"] for line in daemon.log().splitlines()
            if '"standby_started"' in line]


def test_without_standby_workers_a_recycle_spawns_a_fresh_process(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"), extra="standby_workers = 0")
    old = daemon.worker("tiny").pid
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny"))
    assert daemon.worker("tiny").pid != old
    assert standby_pids(daemon) == []
    assert ask(daemon)[-1].usage.completion_tokens == 4


def log_events(daemon, kind: str) -> list[dict]:
    return [e for e in map(json.loads, daemon.log().splitlines()) if e.get("event") == kind]


def spawned_before_exit(daemon, old: int, new: int) -> bool:
    """Whether the log shows the new worker spawned before the old one exited."""
    events = [(e.get("event"), e.get("worker_pid")) for e in map(json.loads, daemon.log().splitlines())]
    return events.index(("worker_spawned", new)) < events.index(("worker_exited", old))


@pytest.mark.parametrize("budget, first", [("", True), ('memory_budget = "100MiB"', False)])
def test_the_replacement_starts_first_only_when_the_memory_budget_holds_both(start_daemon, budget, first):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"), extra=budget)
    old = daemon.worker("tiny").pid  # one worker's estimate (64 MiB at full context) fits in 100 MiB, two do not
    new = daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny")).new_pid
    wait_for(lambda: not pid_alive(old), what="the old worker to exit")
    assert spawned_before_exit(daemon, old, new) == first
    (recycle,) = log_events(daemon, "worker_recycle")
    if first:
        assert recycle["replacement"] == "first"
    else:
        assert recycle["replacement"].startswith("after the old worker exits: memory_budget (100.0 MiB) cannot hold both")
    assert ask(daemon)[-1].usage.completion_tokens == 4


def test_a_hung_worker_is_replaced_and_its_request_ends_at_request_timeout(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", request_timeout="2s", heartbeat_timeout="1s"),
                          extra='poll_interval = "100ms"')
    hung = daemon.worker("tiny").pid
    os.kill(hung, signal.SIGSTOP)  # alive to the kernel, deaf to everything: a call stuck in C looks the same
    try:
        with pytest.raises(grpc.RpcError) as caught:
            ask(daemon)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request_timeout (2 s)" in caught.value.details()
        chunks = ask(daemon)  # waits for the replacement, then succeeds
        assert chunks[-1].worker_pid != hung
        wait_for(lambda: not pid_alive(hung), timeout=10, what="the hung worker to be killed")
        assert "no progress" in daemon.worker("tiny").last_recycle_reason
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGKILL)


def test_a_request_past_request_timeout_ends_alone_and_the_streams_beside_it_go_on(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", engine="tests.engines:SlowEngine", request_timeout="1500ms"),
                          env={"TEST_TOKEN_DELAY": "0.03"})
    pid = daemon.worker("tiny").pid
    long = daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello", options=pb.SamplingOptions(max_tokens=500)))
    got = 0
    for chunk in long:  # ~0.45 s of its 1.5 s
        got += chunk.tokens
        if got >= 15:
            break
    # Started that much later, its own request_timeout ends later: it is running when the first's ends.
    beside = daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="world", options=pb.SamplingOptions(max_tokens=500)))
    arrivals: list[float] = []

    def read_beside():
        try:
            for _ in beside:
                arrivals.append(time.monotonic())
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read_beside)
    reader.start()
    with pytest.raises(grpc.RpcError) as caught:
        list(long)
    ended = time.monotonic()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "serves on" in caught.value.details()
    wait_for(lambda: arrivals and arrivals[-1] > ended, 5, interval=0.01, what="the other stream to go on")
    beside.cancel()
    reader.join(10)
    worker = daemon.worker("tiny")
    assert worker.pid == pid and worker.recycles == 0
    wait_for(lambda: daemon.worker("tiny").pool.sequences_active == 0, 10, what="both sequences to go")


def test_keep_alive_unloads_an_idle_model_and_the_next_request_loads_it_again(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", keep_alive="500ms"), extra='poll_interval = "100ms"')
    first = daemon.worker("tiny").pid
    assert 0 <= daemon.worker("tiny").unload_in_s <= 0.5
    ask(daemon)
    idle = wait_for(lambda: (w := daemon.worker("tiny")).state == "EXITED" and w, what="the idle unload")
    assert "keep_alive (0.5 s)" in idle.last_exit and idle.restarts == 0 and not pid_alive(first)
    second = ask(daemon)[-1].worker_pid  # loads it again
    assert second not in (0, first)
    # A request may change keep_alive for the model: 0 unloads right after it, -1 keeps it forever.
    ask_with = lambda keep: list(daemon.stub.Generate(pb.GenerateRequest(  # noqa: E731
        model="tiny", prompt="hi", keep_alive=keep, options=pb.SamplingOptions(max_tokens=2))))
    pid = ask_with("0")[-1].worker_pid
    wait_for(lambda: not pid_alive(pid), timeout=10, what="keep_alive 0 to unload right after the request")
    ask_with("-1")
    assert daemon.worker("tiny").unload_in_s == -1
    with pytest.raises(grpc.RpcError) as caught:
        ask_with("soon")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "keep_alive" in caught.value.details()


def test_keep_alive_never_unloads_a_worker_mid_request_and_counts_from_its_end(start_daemon):
    # The request runs ~2 s, four times keep_alive: the worker must stay the model's throughout, and for
    # keep_alive after the request, not be drained because the last request *started* long ago.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512, keep_alive="500ms",
                                      engine="tests.engines:SlowEngine"),
                          env={"TEST_TOKEN_DELAY": "0.05"}, extra='poll_interval = "100ms"')
    served_by = ask(daemon, max_tokens=40)[-1].worker_pid

    def unloaded() -> bool:
        return any('"worker_idle_unload"' in line and f'"worker_pid": {served_by},' in line
                   for line in daemon.log().splitlines())

    assert not unloaded()  # not while its request ran
    # At once after it ends, the same worker takes the next request: nothing unloaded it meanwhile.
    assert ask(daemon, max_tokens=1)[-1].worker_pid == served_by
    assert not unloaded()
    wait_for(lambda: not pid_alive(served_by), timeout=10, what="the unload, keep_alive after the last request")


def test_a_worker_hung_mid_stream_is_killed_for_lack_of_progress(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", engine="tests.engines:SlowEngine", heartbeat_timeout="1s"),
                          env={"TEST_TOKEN_DELAY": "0.03"}, extra='poll_interval = "100ms"')
    hung = daemon.worker("tiny").pid
    stream = daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                     options=pb.SamplingOptions(max_tokens=400, temperature=0)))
    next(stream)
    os.kill(hung, signal.SIGSTOP)  # its process and threads exist; no token will ever come
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no progress for" in caught.value.details() and "heartbeat_timeout 1 s" in caught.value.details()
        assert ask(daemon)[-1].worker_pid != hung
        assert not pid_alive(hung)
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGKILL)


def test_steady_slow_generation_is_not_mistaken_for_a_hang(start_daemon):
    # 40 tokens at 50 ms: 2 s of work, twice the heartbeat_timeout, but a beat every token.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", engine="tests.engines:SlowEngine", heartbeat_timeout="1s"),
                          env={"TEST_TOKEN_DELAY": "0.05"}, extra='poll_interval = "100ms"')
    assert ask(daemon, max_tokens=40)[-1].usage.completion_tokens == 40
    assert daemon.worker("tiny").recycles == 0


def test_events_stream_carries_decisions_with_reasons(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf"))
    events = daemon.stub.WatchEvents(pb.WatchEventsRequest(model="tiny"))
    follower = subprocess.Popen([sys.executable, "-m", "supervisor.ctl.main", "--address", daemon.address, "--json",
                                 "events"], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        # Each stream opens with a snapshot of where things stand: then it is subscribed.
        snapshot = next(events)
        assert (snapshot.kind, snapshot.state, snapshot.worker_pid) == ("snapshot", "READY", daemon.worker("tiny").pid)
        assert json.loads(follower.stdout.readline())["kind"] == "snapshot"
        assert llmctl(daemon, "recycle", "tiny").returncode == 0
        seen = []
        for event in events:
            seen.append(event)
            if event.kind == "worker_exited":
                break
        kinds = [e.kind for e in seen]
        assert kinds[0] == "worker_recycle" and "by hand" in seen[0].reason and seen[0].figures["graceful"] == "True"
        assert "worker_state" in kinds and seen[-1].state == "EXITED"
        followed = json.loads(follower.stdout.readline())
        assert followed["kind"] == "worker_recycle" and followed["model"] == "tiny"
    finally:
        events.cancel()
        follower.kill()
        follower.wait()
