"""A graceful recycle under a steady stream of requests, against the bare load time of the same model.

    .venv/bin/python bench/recycle.py [--recycles 5] [--standby-workers 0]

Prints JSON: the time from the recycle decision to the replacement serving (RecycleModel by hand, which
returns when the fresh worker is READY), the bare load time of the model in this process (llama_cpp.Llama
plus the same warm-up), their ratio (target <= 1.2), and the requests that failed (target 0).
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
from supervisor.demo_model import BENCH, write_model  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recycles", type=int, default=5)
    parser.add_argument("--standby-workers", type=int, default=1, help="0 measures recycles without a spare process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llms-bench-") as tmp:
        base = Path(tmp)
        model = write_model(base / "models" / "bench.gguf", BENCH)
        models = '[models.bench]\npath = "bench.gguf"\nn_ctx = 2048\n'
        with daemon(base, models, f"standby_workers = {args.standby_workers}") as (address, _):
            stub = supervisor_pb2_grpc.SupervisorStub(grpc.insecure_channel(address))
            stop = threading.Event()
            counts = {"ok": 0, "failed": 0}
            errors: list[str] = []

            def client() -> None:
                while not stop.is_set():
                    try:
                        list(stub.Generate(pb.GenerateRequest(model="bench", prompt="hello",
                                                              options=pb.SamplingOptions(max_tokens=16))))
                        counts["ok"] += 1
                    except grpc.RpcError as e:
                        counts["failed"] += 1
                        errors.append(e.details())

            clients = [threading.Thread(target=client) for _ in range(2)]
            for t in clients:
                t.start()
            recycle_s = []
            for _ in range(args.recycles):
                start = time.perf_counter()
                stub.RecycleModel(pb.RecycleModelRequest(name="bench"))
                recycle_s.append(time.perf_counter() - start)
                time.sleep(1.0)  # steady traffic on the fresh worker (and time for a new spare) between recycles
            stop.set()
            for t in clients:
                t.join()
        loads = [bare_load(model) for _ in range(3)]
        model_bytes = model.stat().st_size
    result = {
        "benchmark": "recycle",
        "model_bytes": model_bytes,
        "standby_workers": args.standby_workers,
        "recycle_to_ready_s": round(statistics.median(recycle_s), 3),
        "bare_load_s": round(statistics.median(loads), 3),
        "ratio": round(statistics.median(recycle_s) / statistics.median(loads), 2),
        "requests_ok": counts["ok"],
        "requests_failed": counts["failed"],
        "errors": errors[:3],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
