"""llm-supervisord's serve() on a thread of the test process, for what only a fed NVML source can show.

CI has no GPU: the daemon gets supervisor/observe/gpu.py's FedGpu; workers, gRPC and the watch loop are real.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path

import grpc
import psutil

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.settings.config import Host, parse_config
from supervisor.server.daemon import serve
from supervisor.observe.gpu import FedGpu, GpuReading
from tests.conftest import wait_for

MiB = 1 << 20


class InProcessDaemon:
    """serve() on its own event loop thread, with the GPU source a test feeds."""

    def __init__(self, model_dir: Path, models: str, gpu: FedGpu | None = None,
                 env: dict[str, str] | None = None, supervisor: str = "") -> None:
        self.base = Path(tempfile.mkdtemp(prefix="llms-"))
        address = f"unix://{self.base}/s.sock"
        text = (f'[supervisor]\naddress = "{address}"\nstate_dir = "{self.base}/state"\nruntime_dir = "{self.base}/run"\n'
                f'model_dirs = ["{model_dir}"]\npoll_interval = "50ms"\nstandby_workers = 0\n{supervisor}\n{models}\n')
        host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env=env or {})
        self.gpu = gpu or FedGpu()
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
