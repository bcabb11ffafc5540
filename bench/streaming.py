"""Streaming through the supervisor against llama-cpp-python's own generate() loop, side by side.

    .venv/bin/python bench/streaming.py [--lengths 64 512 2048] [--rounds 3]

Generates a ~100 MB f32 llama GGUF, then for each output length alternates: the bare engine in this
process (Llama.generate(), same n_threads, greedy) and a Generate stream through llm-supervisord and its
worker process over real unix-socket gRPC. Prints one JSON object: tokens/s and time to first token of
each, the median over rounds, and their ratio. Target: ratio >= 0.95 at every length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._daemon import bench_daemon  # noqa: E402
from llm_supervisor.v1 import supervisor_pb2 as pb  # noqa: E402
from worker.engine import default_threads  # noqa: E402

PROMPT = "the supervisor keeps the model worker alive and lean"


def bare(llama, n: int) -> tuple[float, float]:
    """(tokens/s after the first token, seconds to the first token) of llama-cpp-python alone."""
    llama.reset()
    tokens = llama.tokenize(PROMPT.encode(), add_bos=True)
    start = time.perf_counter()
    first = 0.0
    count = 0
    for _ in llama.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n:
            break
    end = time.perf_counter()
    return (count - 1) / (end - first), first - start


def through_supervisor(stub, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    request = pb.GenerateRequest(model="bench", prompt=PROMPT, options=pb.SamplingOptions(max_tokens=n, temperature=0))
    for chunk in stub.Generate(request):
        if not first and chunk.tokens:
            first = time.perf_counter()
            first_tokens = chunk.tokens
        tokens += chunk.tokens
    end = time.perf_counter()
    assert tokens == n, f"asked for {n} tokens, got {tokens}"
    return (tokens - first_tokens) / (end - first), first - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-interval", default="50ms", help="the model's stream_interval")
    args = parser.parse_args()
    n_ctx = max(args.lengths) + 256
    threads = default_threads()

    settings = f'n_ctx = {n_ctx}\nn_threads = {threads}\nstream_interval = "{args.stream_interval}"'
    with bench_daemon(settings) as (model, stub):
        from llama_cpp import Llama

        llama = Llama(str(model), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        results = {}
        for n in args.lengths:
            bare(llama, 8), through_supervisor(stub, 8)  # warm both
            runs = {"engine": [], "supervisor": []}
            for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
                runs["engine"].append(bare(llama, n))
                runs["supervisor"].append(through_supervisor(stub, n))
            med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
            results[str(n)] = {
                "engine_tok_s": round(med["engine"][0], 1),
                "supervisor_tok_s": round(med["supervisor"][0], 1),
                "ratio": round(med["supervisor"][0] / med["engine"][0], 3),
                "engine_ttft_ms": round(med["engine"][1] * 1000, 2),
                "supervisor_ttft_ms": round(med["supervisor"][1] * 1000, 2),
            }
        print(json.dumps({"benchmark": "streaming", "model_bytes": model.stat().st_size, "n_threads": threads,
                          "stream_interval": args.stream_interval,
                          "rounds": args.rounds, "lengths": results}, indent=2))


if __name__ == "__main__":
    main()
