"""Two daemons behind one client, as many boxes run: gRPC's round_robin with health checking and retries
(the service config llmctl uses), TLS and tokens on. A SIGTERM'd daemon drops nothing; a killed one fails
only the requests it was already answering, and nothing hangs."""

from __future__ import annotations

import concurrent.futures
import signal
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.ctl.main import BALANCING
from tests.conftest import launch, model_table, wait_for
from tests.pki import make_pki

TOKEN = "failover-admin-token-0123456789"
REQUESTS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pair(model_dir, tmp_path):
    """Start two daemons on TCP with TLS and a token; yields (start, client) where start(port) starts one."""
    pki = make_pki(tmp_path)
    (tmp_path / "admin.tokens").write_text(TOKEN + "\n")
    sections = (f'[tls]\ncert = "{pki["server.crt"]}"\nkey = "{pki["server.key"]}"\n'
                f'[auth]\nadmin_tokens_file = "{tmp_path}/admin.tokens"\n')
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca.crt"].read_bytes())
    started = []

    def start(port: int):
        # Slow tokens (10 ms each): requests are still in flight when a daemon goes. One at a time
        # (parallel = 1): the kill below may fail only the request the daemon was streaming, which with
        # continuous batching would be as many as it streams at once.
        daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256, parallel=1,
                                               engine="tests.engines:SlowEngine")
                        + "\n" + sections, extra='shutdown_delay = "1s"', address=f"127.0.0.1:{port}",
                        credentials=credentials, env={"TEST_TOKEN_DELAY": "0.01"})
        started.append(daemon)
        return daemon

    def client(ports: list[int]) -> supervisor_pb2_grpc.SupervisorStub:
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        # A restarted daemon is tried again within half a second (gRPC's own default backs off up to 2 minutes).
        channel = grpc.secure_channel(target, credentials, options=BALANCING + [
            ("grpc.ssl_target_name_override", "localhost"), ("grpc.max_reconnect_backoff_ms", 500)])
        return supervisor_pb2_grpc.SupervisorStub(channel)

    yield start, client
    for daemon in started:
        daemon.stop()


def ask(stub) -> pb.GenerateChunk:
    chunks = list(stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=20)),
                                metadata=[("authorization", f"Bearer {TOKEN}")], timeout=120))
    return chunks[-1]


def queued(daemon) -> int:
    return sum(w.queue_depth for w in daemon.stub.Status(pb.StatusRequest(), metadata=[("authorization", f"Bearer {TOKEN}")]).workers)


def test_a_sigterm_drops_nothing_and_a_kill_fails_only_what_it_was_answering(pair):
    start, client = pair
    ports = [free_port(), free_port()]
    first, second = start(ports[0]), start(ports[1])
    stub = client(ports)
    pool = concurrent.futures.ThreadPoolExecutor(REQUESTS)

    # SIGTERM: the daemon reports NOT_SERVING, the client stops picking it, what it took it finishes.
    calls = [pool.submit(ask, stub) for _ in range(REQUESTS)]
    wait_for(lambda: queued(first) > 3 and queued(second) > 3, what="requests queued on both daemons")
    first.proc.send_signal(signal.SIGTERM)
    finals = [c.result(timeout=120) for c in calls]  # raises if any failed
    assert all(f.usage.completion_tokens == 20 for f in finals)
    assert first.proc.wait(60) == 0
    served_by = {f.worker_pid for f in finals}
    assert len(served_by) == 2  # both daemons' workers answered

    # kill -9 with requests in flight on it: those it was streaming fail UNAVAILABLE; those waiting in
    # its queue had received nothing, so gRPC retries them on the other daemon; nothing hangs.
    third = start(ports[0])
    restarted = {w.pid for w in third.stub.Status(pb.StatusRequest(), metadata=[("authorization", f"Bearer {TOKEN}")]).workers}
    wait_for(lambda: ask(stub).worker_pid in restarted, what="the client to use the restarted daemon")
    calls = [pool.submit(ask, stub) for _ in range(REQUESTS)]
    wait_for(lambda: queued(third) > 3 and queued(second) > 3, what="requests queued on both daemons")
    third.proc.send_signal(signal.SIGKILL)
    done, pending = concurrent.futures.wait(calls, timeout=120)
    assert not pending, "requests hung after a daemon was killed"
    failed = [c.exception() for c in done if c.exception() is not None]
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failed), failed
    assert len(failed) <= 2, f"only the request the killed daemon was streaming may fail, not {len(failed)}"
    assert sum(c.exception() is None for c in done) >= REQUESTS - 2
    pool.shutdown()


def test_a_recycle_with_its_replacement_on_the_way_is_not_an_outage(start_daemon):
    # Replacements take a second to load here, long enough to watch. Requests wait in the queue meanwhile,
    # so neither readiness, liveness nor the model's own health may say NOT_SERVING: a probe that did would
    # take the pod out of its Service — or get it killed — for a routine recycle.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256, engine="tests.engines:SlowEngine"),
                          env={"TEST_LOAD_DELAY": "1"}, extra="standby_workers = 0")
    services = ("", "liveness", "llm_supervisor.v1.Supervisor", "model/tiny")
    check = lambda: {s: daemon.health.Check(health_pb2.HealthCheckRequest(service=s)).status for s in services}  # noqa: E731
    everything_serves = {s: health_pb2.HealthCheckResponse.SERVING for s in services}
    assert check() == everything_serves
    old_pid = daemon.worker("tiny").pid
    recycled = concurrent.futures.ThreadPoolExecutor(1).submit(
        daemon.stub.RecycleModel, pb.RecycleModelRequest(name="tiny"))
    seen = []
    while not recycled.done():
        seen.append(check())
    recycled.result(timeout=60)
    assert daemon.worker("tiny").pid != old_pid
    assert len(seen) > 5 and all(s == everything_serves for s in seen), [s for s in seen if s != everything_serves][:3]
