"""sd_notify as systemd would see it: a NOTIFY_SOCKET datagram socket the test binds and reads."""

from __future__ import annotations

import queue
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.observe.gpu import FedGpu
from supervisor.server.notify import Notifier, summary, watchdog_interval
from tests.conftest import model_table
from tests.inprocess import InProcessDaemon


class NotifySocket:
    """What systemd listens on: one datagram per sd_notify call. Read all the time, as systemd does: a
    unix datagram socket queues only a few messages, and then the sender blocks."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="llms-")) / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            self.messages.put(self.sock.recv(4096).decode())

    def env(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}

    def next(self, timeout: float) -> str | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def until(self, words: str, timeout: float = 30.0) -> list[str]:
        """Messages up to and including the first that contains `words`."""
        seen: list[str] = []
        while True:
            message = self.next(timeout)
            assert message is not None, f"no {words!r} from the daemon; got {seen}"
            seen.append(message)
            if words in message:
                return seen

    def drain(self) -> None:
        while self.next(0.01) is not None:
            pass


@pytest.mark.parametrize("env, pid, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 7, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({}, 7, None),
])
def test_watchdog_interval_from_systemds_variables(env, pid, expected):
    assert watchdog_interval(env, pid) == expected


def test_status_line_reads_like_systemctl_status():
    assert summary(["READY", "BUSY", "BUSY"], ("qwen", "leak", 185.0)) == "3 models, 2 busy, last recycle: qwen leak 3m ago"
    assert summary(["READY"], None) == "1 model, 0 busy"
    assert summary(["FATAL", "READY"], None) == "2 models, 0 busy, 1 failing"


def test_not_under_systemd_nothing_is_sent():
    sent: list[str] = []
    notifier = Notifier({}, send=sent.append)
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()
    assert sent == []


def test_ready_status_watchdog_and_stopping_from_a_real_daemon(start_daemon):
    notify = NotifySocket()
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), env=notify.env(watchdog_s=1.0))
    ready = notify.until("READY=1")[-1]
    assert "STATUS=1 model, 0 busy" in ready  # sent once the socket listens and the models are loaded
    pings = [m for m in notify.until("WATCHDOG=1") + notify.until("WATCHDOG=1")]
    assert pings[-1] == "WATCHDOG=1"
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny"))
    status = notify.until("last recycle: tiny")[-1]
    assert status.startswith("STATUS=1 model, 0 busy, last recycle: tiny recycled by hand")
    daemon.proc.send_signal(15)
    assert "STOPPING=1" in notify.until("STOPPING=1")[-1]


class HangingGpu(FedGpu):
    """An NVML whose reads block, as they do on a GPU that fell off the bus."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = threading.Event()
        self.hung = threading.Event()
        self.release = threading.Event()

    def processes(self):
        if self.hang.is_set():
            self.hung.set()
            self.release.wait()
        return super().processes()


def test_no_watchdog_ping_while_the_monitor_loop_is_stuck_but_the_api_still_answers(model_dir, monkeypatch):
    notify = NotifySocket()
    env = notify.env(watchdog_s=0.4)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # sd_notify reads the process environment itself
    gpu = HangingGpu()
    daemon = InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512), gpu=gpu, env=env)
    try:
        notify.until("READY=1")
        notify.until("WATCHDOG=1")
        gpu.hang.set()
        assert gpu.hung.wait(10)
        notify.drain()  # a ping already on its way when the read hung
        silence = [m for m in iter(lambda: notify.next(1.0), None) if "WATCHDOG=1" in m]
        assert silence == [], "the loop is stuck: systemd must see no WATCHDOG=1 and restart the service"
        assert daemon.stub.Status(pb.StatusRequest(), timeout=5).workers[0].state == "READY"
        gpu.release.set()
        notify.until("WATCHDOG=1", timeout=10)
    finally:
        gpu.release.set()
        daemon.stop()


class FailingGpu(FedGpu):
    """A GPU source whose reads raise what no one expected (not an NVMLError)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = threading.Event()

    def processes(self):
        if self.failing.is_set():
            raise RuntimeError("driver returned garbage")
        return super().processes()


def test_a_watch_loop_that_cannot_complete_a_pass_stops_the_watchdog_and_liveness_but_not_the_api(model_dir, monkeypatch):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import wait_for

    notify = NotifySocket()
    env = notify.env(watchdog_s=0.4)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gpu = FailingGpu()
    daemon = InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512), gpu=gpu, env=env)
    health = health_pb2_grpc.HealthStub(daemon.channel)
    status = lambda service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # noqa: E731
    try:
        notify.until("WATCHDOG=1")
        assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
        gpu.failing.set()
        # Every pass now fails: logged and counted, the loop goes on, but systemd hears no WATCHDOG=1 and
        # kubelet's liveness probe reads NOT_SERVING — both would restart the daemon.
        wait_for(lambda: status("liveness") == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=15,
                 what="liveness NOT_SERVING")
        notify.drain()
        silence = [m for m in iter(lambda: notify.next(1.0), None) if "WATCHDOG=1" in m]
        assert silence == []
        assert status("") == health_pb2.HealthCheckResponse.SERVING  # it still takes requests
        assert daemon.stub.Status(pb.StatusRequest(), timeout=5).workers[0].state == "READY"
        gpu.failing.clear()  # the loop was never dead: passes complete again
        notify.until("WATCHDOG=1", timeout=10)
        wait_for(lambda: status("liveness") == health_pb2.HealthCheckResponse.SERVING, timeout=15,
                 what="liveness SERVING again")
    finally:
        gpu.failing.clear()
        daemon.stop()
