"""GPU temperature and GPU memory through the NVML seam, with a real daemon and real workers.

CI has no GPU, so the daemon runs in this process with a fed NVML source (supervisor/observe/gpu.py's FedGpu):
everything else — workers, gRPC, the watch loop — is real.
"""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import model_table, pid_alive, wait_for
from tests.inprocess import MiB, InProcessDaemon


@pytest.fixture
def gpu_daemon(model_dir):
    daemon = InProcessDaemon(model_dir, model_table(
        "tiny", "tiny.gguf", n_ctx=512, temperature_throttle=80, temperature_critical=90, temperature_hysteresis=5))
    yield daemon
    daemon.stop()


def generate(daemon) -> concurrent.futures.Future:
    def call():
        return list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                            options=pb.SamplingOptions(max_tokens=4))))
    return concurrent.futures.ThreadPoolExecutor(1).submit(call)


def events_of(daemon) -> list[pb.Event]:
    seen: list[pb.Event] = []
    stream = daemon.stub.WatchEvents(pb.WatchEventsRequest(model="tiny"))

    def follow() -> None:
        try:
            seen.extend(stream)
        except grpc.RpcError:  # the daemon stopped at the end of the test
            pass

    threading.Thread(target=follow, daemon=True).start()
    wait_for(lambda: seen, what="the snapshot event: from then on the stream is subscribed")
    return seen


def test_gpu_memory_and_temperature_show_in_status(gpu_daemon):
    pid = gpu_daemon.worker().pid
    gpu_daemon.heat(pid, 61)
    worker = wait_for(lambda: (w := gpu_daemon.worker()).gpu_temperature_c == 61 and w, what="a poll")
    assert worker.gpu_memory_bytes == 500 * MiB and worker.throttle_reason == ""
    status = gpu_daemon.stub.Status(pb.StatusRequest())
    assert [(g.index, g.temperature_c, g.memory_total_bytes) for g in status.gpus] == [(0, 61, 80_000 * MiB)]


def test_throttle_holds_requests_until_the_gpu_cools_below_the_hysteresis(gpu_daemon):
    events = events_of(gpu_daemon)
    pid = gpu_daemon.worker().pid
    gpu_daemon.heat(pid, 83)
    wait_for(lambda: "GPU 0 at 83 °C" in gpu_daemon.worker().throttle_reason, what="the throttle")
    held = generate(gpu_daemon)
    wait_for(lambda: gpu_daemon.worker().queue_depth == 1, what="the request to wait at the door")
    gpu_daemon.heat(pid, 78)  # below the line, not below line - hysteresis: still shut
    wait_for(lambda: gpu_daemon.worker().gpu_temperature_c == 78, what="a poll at 78 °C")
    assert not held.done() and gpu_daemon.worker().throttle_reason
    gpu_daemon.heat(pid, 70)
    assert held.result(timeout=30)[-1].usage.completion_tokens == 4
    assert gpu_daemon.worker().pid == pid and gpu_daemon.worker().throttle_reason == ""
    kinds = wait_for(lambda: [e.kind for e in events if e.kind.startswith("gpu_")] or None, what="events")
    wait_for(lambda: "gpu_cool" in [e.kind for e in events], what="the cool event")
    assert kinds[0] == "gpu_throttle"


def test_critical_drains_and_unloads_and_the_model_comes_back_once_cool(gpu_daemon):
    events = events_of(gpu_daemon)
    pid = gpu_daemon.worker().pid
    gpu_daemon.heat(pid, 95)
    wait_for(lambda: not pid_alive(pid), what="the worker on a critical GPU to be unloaded")
    critical = wait_for(lambda: [e for e in events if e.kind == "gpu_critical"], what="the critical event")[0]
    assert "GPU 0 at 95 °C, at or above temperature_critical (90 °C)" in critical.reason
    held = generate(gpu_daemon)
    wait_for(lambda: gpu_daemon.worker().queue_depth == 1, what="the request to wait for the GPU")
    assert gpu_daemon.worker().pid == 0  # not loaded again onto a hot GPU
    gpu_daemon.heat(0, 60)
    chunks = held.result(timeout=60)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].worker_pid not in (0, pid)


def test_no_start_of_any_kind_loads_a_worker_onto_a_gpu_past_its_line(model_dir):
    daemon = InProcessDaemon(model_dir, model_table(
        "tiny", "tiny.gguf", n_ctx=512, temperature_throttle=80, temperature_critical=90, request_timeout="1s"))
    try:
        pid = daemon.worker().pid
        daemon.heat(pid, 95)
        wait_for(lambda: not pid_alive(pid) and daemon.worker().pid == 0, what="the unload on a critical GPU")
        # Tokenize and `llmctl start` start a worker without going through the request queue's door.
        with pytest.raises(grpc.RpcError) as tokenize:
            daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello"), timeout=30)
        assert tokenize.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not starting a worker: GPU 0 at 95 °C" in tokenize.value.details()
        with pytest.raises(grpc.RpcError) as start:
            daemon.stub.StartModel(pb.StartModelRequest(name="tiny"), timeout=30)
        assert "GPU 0 at 95 °C" in start.value.details()
        assert daemon.worker().pid == 0 and daemon.worker().state != "FATAL"  # too hot is not broken
        daemon.heat(0, 60)
        assert daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello"), timeout=30).count > 0
        assert daemon.worker().pid not in (0, pid)
    finally:
        daemon.stop()


def test_an_unload_does_not_wait_for_a_start_held_at_a_hot_gpu(model_dir):
    daemon = InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512, temperature_critical=90))
    try:
        events = events_of(daemon)
        pid = daemon.worker().pid
        daemon.heat(pid, 95)
        wait_for(lambda: not pid_alive(pid) and daemon.worker().pid == 0, what="the unload on a critical GPU")
        # A start waits at the door (for request_timeout, 10 minutes here) …
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            daemon.stub.Tokenize, pb.TokenizeRequest(model="tiny", text="hello"))
        wait_for(lambda: any(e.kind == "replica_state" and e.reason == "starting" for e in events),
                 what="the start to wait at the door")
        assert not waiting.done()
        # … and an unload does not wait with it: the start is called off.
        daemon.stub.UnloadModel(pb.UnloadModelRequest(name="tiny"), timeout=15)
        with pytest.raises(grpc.RpcError) as ended:
            waiting.result(timeout=15)
        assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    finally:
        daemon.stop()

