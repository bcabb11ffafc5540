"""GPU temperature and GPU memory through the NVML seam, with a real daemon and real workers.

CI has no GPU, so the daemon runs in this process with a fed NVML source (supervisor/gpu.py's FedGpu):
everything else — workers, gRPC, the watch loop — is real.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import tempfile
import threading
from pathlib import Path

import grpc
import psutil
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.config import Host, parse_config
from supervisor.daemon import serve
from supervisor.gpu import FedGpu, GpuReading
from tests.conftest import model_table, pid_alive, wait_for

MiB = 1 << 20


class InProcessDaemon:
    """serve() on its own event loop thread, with the GPU source a test feeds."""

    def __init__(self, model_dir: Path, models: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="llms-"))
        address = f"unix://{self.base}/s.sock"
        text = (f'[supervisor]\naddress = "{address}"\nstate_dir = "{self.base}/state"\nruntime_dir = "{self.base}/run"\n'
                f'model_dirs = ["{model_dir}"]\npoll_interval = "50ms"\nstandby_workers = 0\n{models}\n')
        host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env={})
        self.gpu = FedGpu()
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        config = parse_config(text, host)

        async def run() -> None:
            self.stop_event = asyncio.Event()
            await serve(config, host, self.stop_event, gpu=self.gpu)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(run(),), daemon=True)
        self.thread.start()
        self.channel = grpc.insecure_channel(address)
        self.stub = supervisor_pb2_grpc.SupervisorStub(self.channel)
        wait_for(self._serving, timeout=60, what="the in-process daemon to serve")

    def _serving(self) -> bool:
        try:
            return any(w.state == "READY" for w in self.stub.Status(pb.StatusRequest(), timeout=1).workers)
        except grpc.RpcError:
            return False

    def worker(self) -> pb.WorkerStatus:
        return self.stub.Status(pb.StatusRequest()).workers[0]

    def heat(self, pid: int, temperature: int) -> None:
        self.gpu.memory = {pid: {0: 500 * MiB}} if pid else self.gpu.memory
        self.gpu.gpus = [GpuReading(index=0, temperature_c=temperature, throttle_reasons=0,
                                    memory_used=600 * MiB, memory_total=80_000 * MiB)]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        self.channel.close()


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
