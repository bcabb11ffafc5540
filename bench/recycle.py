"""A graceful recycle under a steady stream of requests, against the bare load time of the same model.

    .venv/bin/python bench/recycle.py [--recycles 5] [--standby-workers 0]

Prints JSON: the time from a recycle decision to the replacement serving, two ways — by hand
(RecycleModel, which returns when the fresh worker is READY; it lands mid-request, so it includes the old
worker finishing that request) and by the watchdog (max_requests, decided at a request boundary; from its
worker_recycle event to the READY event) — against the bare load time of the model in this process
(llama_cpp.Llama plus the same warm-up), the ratios (target <= 1.2), and the requests that failed (target 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._daemon import daemon  # noqa: E402
from llm_supervisor.v1 import supervisor_pb2 as pb  # noqa: E402
from llm_supervisor.v1 import supervisor_pb2_grpc  # noqa: E402
from supervisor.settings.demo_model import BENCH, write_model  # noqa: E402
from worker.engine import LlamaEngine  # noqa: E402


def bare_load(path: Path) -> float:
    """Load and warm up in this process, llama.cpp's log sent to /dev/null as a worker's goes to a pipe."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        start = time.perf_counter()
        engine = LlamaEngine()
        engine.load(str(path), {"n_ctx": 2048, "n_batch": 512})
        engine.warm_up()
        elapsed = time.perf_counter() - start
        engine.close()
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
    return elapsed


class Load:
    """Two clients streaming non-stop; counts what succeeds and what fails."""

    def __init__(self, stub) -> None:
        self.stub, self.stop = stub, threading.Event()
        self.ok, self.failed, self.errors = 0, 0, []
        self.threads = [threading.Thread(target=self._client) for _ in range(2)]

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                list(self.stub.Generate(pb.GenerateRequest(model="bench", prompt="hello",
                                                           options=pb.SamplingOptions(max_tokens=16))))
                self.ok += 1
            except grpc.RpcError as e:
                self.failed += 1
                self.errors.append(e.details())

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def by_hand(stub, recycles: int) -> list[float]:
    """RecycleModel at arbitrary moments: mostly mid-request, so the time includes the old worker
    finishing the request it has (the replacement warms up after it)."""
    times = []
    for _ in range(recycles):
        start = time.perf_counter()
        stub.RecycleModel(pb.RecycleModelRequest(name="bench"))
        times.append(time.perf_counter() - start)
        time.sleep(1.0)  # steady traffic on the fresh worker (and time for a new spare) between recycles
    return times


def by_watchdog(stub, recycles: int) -> list[float]:
    """Recycles the watchdog decides (max_requests): from its worker_recycle event to the replacement's
    READY event, both stamped by the daemon."""
    events = stub.WatchEvents(pb.WatchEventsRequest(model="bench"))
    times, decided = [], None
    for event in events:
        if event.kind == "worker_recycle":
            decided = event.time_unix
        elif decided is not None and event.kind == "worker_state" and event.state == "READY":
            times.append(event.time_unix - decided)
            decided = None
            if len(times) == recycles:
                events.cancel()
                break
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recycles", type=int, default=5)
    parser.add_argument("--standby-workers", type=int, default=1, help="0 measures recycles without a spare process")
    args = parser.parse_args()
    spares = f"standby_workers = {args.standby_workers}"
    results, counts = {}, {"ok": 0, "failed": 0, "errors": []}
    with tempfile.TemporaryDirectory(prefix="llms-bench-") as tmp:
        base = Path(tmp)
        model = write_model(base / "models" / "bench.gguf", BENCH)
        runs = [("by_hand", "", by_hand),
                # ~1.5 s of traffic per worker: time for a spare to come back between recycles.
                ("by_watchdog", "max_requests = 25\n", by_watchdog)]
        for name, extra, measure in runs:
            models = f'[models.bench]\npath = "bench.gguf"\nn_ctx = 2048\n{extra}'
            with daemon(base, models, spares) as (address, _):
                stub = supervisor_pb2_grpc.SupervisorStub(grpc.insecure_channel(address))
                with Load(stub) as load:
                    results[name] = measure(stub, args.recycles)
                counts["ok"] += load.ok
                counts["failed"] += load.failed
                counts["errors"] += load.errors[:3]
        loads = [bare_load(model) for _ in range(3)]
        model_bytes = model.stat().st_size
    bare = statistics.median(loads)
    result = {"benchmark": "recycle", "model_bytes": model_bytes, "standby_workers": args.standby_workers,
              "bare_load_s": round(bare, 3)}
    for name, times in results.items():
        result[f"{name}_to_ready_s"] = round(statistics.median(times), 3)
        result[f"{name}_ratio"] = round(statistics.median(times) / bare, 2)
    result.update(requests_ok=counts["ok"], requests_failed=counts["failed"], errors=counts["errors"][:3])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
