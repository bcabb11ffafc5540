"""What a second replica of a model costs the host, beside its own private memory.

    .venv/bin/python -m bench.replicas [--runs 3] [--quant Q4_0]

Loads one model with replicas = 1, then with replicas = 2 (its weights already in the page cache), and
reads the host's MemAvailable before and after each. The second replica should cost about its own
private memory: its weights are the same page-cache pages as the first's — except the matrices
llama.cpp's CPU backend repacks at load (Q4_0, Q4_K, IQ4_NL: `--quant Q4_0` shows it), which every
replica holds privately; `repacked_mib` is the estimate's figure for them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import grpc
import psutil

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.settings.demo_model import BENCH, FTYPES, quantize, write_model

from ._daemon import daemon

MiB = 1 << 20


def host_cost(stub, replicas: int) -> tuple[int, list[int]]:
    """(MemAvailable consumed by loading the model with `replicas`, each replica's private memory)."""
    before = psutil.virtual_memory().available
    reply = stub.LoadModel(pb.LoadModelRequest(name="m", path="bench.gguf",
                                               options={"replicas": str(replicas), "n_ctx": "512"}))
    after = psutil.virtual_memory().available
    private = [w.private_memory_bytes for w in stub.Status(pb.StatusRequest()).workers if w.model == "m"]
    stub.UnloadModel(pb.UnloadModelRequest(name="m"))
    return before - after, private, reply.model.estimate.weights_repacked_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quant", choices=sorted(FTYPES), help="quantize the model first (default: f32)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="llms-bench-"))
    model = write_model(base / "models" / "bench.gguf", BENCH)
    if args.quant:  # llama.cpp's quantizer, in this process: a benchmark, not the daemon
        model = quantize(model, model, args.quant)
    model.read_bytes()  # into the page cache: the runs compare workers, not a first read from disk
    second, private = [], []
    with daemon(base, "", "standby_workers = 0") as (address, _):
        stub = supervisor_pb2_grpc.SupervisorStub(grpc.insecure_channel(address))
        for _ in range(args.runs):
            one, _, repacked = host_cost(stub, 1)
            two, each, _ = host_cost(stub, 2)
            second.append(two - one)
            private.append(each[1])
    print(json.dumps({
        "quant": args.quant or "F32",
        "weights_mib": round(model.stat().st_size / MiB, 1),
        "repacked_mib": round(repacked / MiB, 1),  # private in every replica, by the estimate
        "second_replica_host_cost_mib": round(statistics.median(second) / MiB, 1),
        "second_replica_private_mib": round(statistics.median(private) / MiB, 1),
        "ratio_cost_to_private": round(statistics.median(second) / statistics.median(private), 2),
        # What it would cost if each replica held its own copy of the weights.
        "without_sharing_mib": round((statistics.median(private) + model.stat().st_size) / MiB, 1),
        "runs": args.runs,
    }))


if __name__ == "__main__":
    main()
