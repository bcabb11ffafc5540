"""Fixtures: a generated tiny GGUF, and real llm-supervisord processes talking real gRPC."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.settings.demo_model import write_model

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll until predicate() is truthy; its value is returned. Fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def in_background(calls) -> tuple[threading.Thread, dict]:
    """Consume a response stream on a thread: result["chunks"] when it ends, result["error"] if it fails."""
    result: dict = {}

    def consume():
        try:
            result["chunks"] = list(calls)
        except grpc.RpcError as e:
            result["error"] = e

    thread = threading.Thread(target=consume)
    thread.start()
    return thread, result


def quantize_beside(source: Path, kinds: tuple[str, ...]) -> None:
    """`source`'s quantizations, as KIND.gguf beside it, made by llama.cpp's own quantizer in a process of
    its own: a build that cannot run here kills that process, not pytest."""
    script = ("import sys, pathlib; from supervisor.settings.demo_model import quantize\n"
              "for kind in sys.argv[2:]: quantize(sys.argv[1], pathlib.Path(sys.argv[1]).with_name(kind + '.gguf'), kind)")
    subprocess.run([sys.executable, "-c", script, str(source), *kinds], check=True, cwd=ROOT, capture_output=True)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_model(directory / "tiny.gguf")
    return directory


@dataclass
class Daemon:
    proc: subprocess.Popen
    address: str
    run_dir: Path
    state_dir: Path
    log_path: Path
    base: Path
    credentials: grpc.ChannelCredentials | None = None  # TLS, for a daemon that listens with it
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = (grpc.secure_channel(self.address, self.credentials) if self.credentials
                        else grpc.insecure_channel(self.address))
        self.stub = supervisor_pb2_grpc.SupervisorStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def http_url(self) -> str:
        """http://host:port of the HTTP API, as its http_listening line says (the port may have been 0)."""
        for line in self.log().splitlines():
            if '"http_listening"' in line:
                return f"http://{json.loads(line)['address']}"
        raise AssertionError(f"the daemon serves no HTTP API:\n{self.log()}")

    def worker(self, model: str) -> pb.WorkerStatus:
        return next(w for w in self.stub.Status(pb.StatusRequest()).workers if w.model == model)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def serving():
            if self.proc.poll() is not None:
                raise AssertionError(f"llm-supervisord exited with {self.proc.returncode}:\n{self.log()}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_for(serving, timeout, interval=0.05, what="the daemon to serve")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        shutil.rmtree(self.base, ignore_errors=True)


def loaded_models(daemon) -> list[pb.ModelInfo]:
    """ListModels without what is only on disk (state AVAILABLE)."""
    return [m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models if m.state != "AVAILABLE"]


def model_table(name: str, path: Path | str, **options) -> str:
    lines = [f"[models.{name}]", f'path = "{path}"']
    for key, value in options.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false"))
    return "\n".join(lines)


def launch(model_dir: Path, models: str = "", env: dict[str, str] | None = None, extra: str = "",
           config: bool = True, address_flag: bool = False, state_dir: Path | None = None,
           prefix: tuple[str, ...] = (), address: str = "",
           credentials: grpc.ChannelCredentials | None = None, http_address: str | None = None,
           embedded_http: bool = False) -> Daemon:
    """Start llm-supervisord in a fresh directory and wait until it serves (with --address if asked).
    Give `state_dir` to keep state across daemons (it is not removed with the daemon's directory);
    `prefix` runs it under a command such as prlimit; `address` (--address) listens elsewhere, e.g. on TCP
    with `credentials` for TLS; `http_address` is --http-address (the embedded default's 127.0.0.1:11434 is
    replaced by a free port unless `embedded_http`)."""
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be too deep.
    base = Path(tempfile.mkdtemp(prefix="llms-"))
    run_dir, state_dir = base / "run", state_dir or base / "state"
    address_flag = address_flag or bool(address)
    address = address or f"unix://{base / 'flag.sock' if address_flag else run_dir / 'supervisor.sock'}"
    log_path = base / "daemon.log"
    process_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [*prefix, sys.executable, "-m", "supervisor.server.daemon"]
    if config:
        config_path = base / "config.toml"
        config_path.write_text(
            f'[supervisor]\naddress = "unix://{run_dir}/supervisor.sock"\nstate_dir = "{state_dir}"\nruntime_dir = "{run_dir}"\n'
            f'model_dirs = ["{model_dir}"]\n{extra}\n{models}\n'
        )
        cmd += ["--config", str(config_path)]
    else:  # the embedded default, with systemd's directory variables pointing into the test's directory
        process_env.update(STATE_DIRECTORY=str(state_dir), RUNTIME_DIRECTORY=str(run_dir))
    if address_flag:
        cmd += ["--address", address]
    if http_address is None and not config and not embedded_http:
        http_address = "127.0.0.1:0"
    if http_address is not None:
        cmd += ["--http-address", http_address]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=process_env, cwd=ROOT)
    daemon = Daemon(proc, address, run_dir, state_dir, log_path, base, credentials)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    return daemon


@pytest.fixture
def start_daemon(model_dir: Path):
    """start_daemon(models_toml, env=...) → a running Daemon; all are stopped at teardown."""
    started: list[Daemon] = []

    def start(models: str = "", **kwargs) -> Daemon:
        daemon = launch(model_dir, models, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


HTTP = '[http]\naddress = "127.0.0.1:0"\n'  # the HTTP API on a free port (Daemon.http_url finds it)


@pytest.fixture(scope="module")
def http_daemon(model_dir: Path, tmp_path_factory):
    """One daemon with the HTTP API serving `tiny` (text) and `emb` (embeddings, the same GGUF), in a
    model directory of its own: what other tests leave in the shared one would be listed as on disk."""
    own = tmp_path_factory.mktemp("http-models")
    shutil.copy(model_dir / "tiny.gguf", own / "tiny.gguf")
    daemon = launch(own, model_table("tiny", "tiny.gguf", n_ctx=1024) + "\n"
                    + model_table("emb", "tiny.gguf", n_ctx=512, embedding=True), extra=HTTP)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def shared_daemon(model_dir: Path):
    """One daemon serving `tiny` for the read-mostly tests of a module (starting one costs ~1 s)."""
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512))
    yield daemon
    daemon.stop()
