"""Start llm-supervisord for a benchmark, in a temporary directory, and wait until it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.settings.demo_model import BENCH, write_model

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def daemon(base: Path, models_toml: str, supervisor_toml: str = "", timeout: float = 120.0):
    """Yields the address of a daemon serving `models_toml`, with its models under base/models."""
    address = f"unix://{base}/s.sock"
    config = base / "config.toml"
    config.write_text(f'[supervisor]\naddress = "{address}"\nstate_dir = "{base}/state"\nruntime_dir = "{base}/run"\n'
                      f'model_dirs = ["{base}/models"]\n{supervisor_toml}\n{models_toml}\n')
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.server.daemon", "--config", str(config), "--log-level", os.environ.get("BENCH_LOG_LEVEL", "warning")],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the daemon did not come up")
            time.sleep(0.1)
        yield address, proc
    finally:
        proc.terminate()
        proc.wait(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def bench_daemon(settings: str, http_port: int = 0):
    """A daemon serving the generated ~100 MB model as `bench`, with `settings` (TOML lines) for it,
    and the HTTP API on 127.0.0.1:`http_port` if one is given: yields (the model's path, a Supervisor stub)."""
    with tempfile.TemporaryDirectory(prefix="llms-bench-") as tmp:
        base = Path(tmp)
        model = write_model(base / "models" / "bench.gguf", BENCH)
        http = f'[http]\naddress = "127.0.0.1:{http_port}"\n' if http_port else ""
        with daemon(base, f'{http}[models.bench]\npath = "bench.gguf"\n{settings}\n') as (address, _):
            yield model, supervisor_pb2_grpc.SupervisorStub(grpc.insecure_channel(address))
