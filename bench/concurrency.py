"""Concurrent streams through one worker against the engine's own batched ceiling, side by side.

    .venv/bin/python bench/concurrency.py [--levels 1 2 4 8] [--tokens 256] [--rounds 2]

Generates a ~100 MB f32 llama GGUF. At each level N, alternately: the engine alone in this process
(worker.engine.LlamaEngine: N sequences decoded together, one llama_batch a step, greedy, same threads,
no supervisor, no gRPC) and N concurrent Generate streams through llm-supervisord and one worker with
`parallel` = the largest level. Prints one JSON object: aggregate completion tokens/s of each, their
ratio, the speedup over one stream, and the median time to first token; then the time to first token of
a short request alone and while three others stream.

Targets on a 2-core machine: 4 streams >= 1.8x one stream and >= 0.85x the engine's 4-sequence ceiling;
a short request's time to first token beside 3 streams <= 2x its time alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._daemon import bench_daemon  # noqa: E402
from llm_supervisor.v1 import supervisor_pb2 as pb  # noqa: E402
from worker.engine import Chunk, LlamaEngine, default_threads  # noqa: E402
from worker.generation import Sampling  # noqa: E402

PROMPTS = ["the supervisor keeps the model worker alive", "one two three four five six", "hello world memory leak",
           "the cache and the context of a request", "stream token worker model", "yes no one two",
           "this is the model of a worker", "memory context cache leak"]


def engine_ceiling(engine: LlamaEngine, n: int, tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median seconds to first token) of n sequences decoded together."""
    prompts = [engine.tokenize(PROMPTS[i % len(PROMPTS)], True) for i in range(n)]
    samplers = [engine.sampler(Sampling(temperature=0.0)) for _ in range(n)]
    start = time.perf_counter()
    engine.decode([Chunk(i, p, 0, True) for i, p in enumerate(prompts)])
    index, rows = 0, []
    for p in prompts:
        index += len(p)
        rows.append(index - 1)
    last = [s.sample(r) for s, r in zip(samplers, rows)]
    first = time.perf_counter() - start
    positions = [len(p) for p in prompts]
    for _ in range(tokens - 1):
        engine.decode([Chunk(i, [t], positions[i], True) for i, t in enumerate(last)])
        positions = [p + 1 for p in positions]
        last = [s.sample(i) for i, s in enumerate(samplers)]
    elapsed = time.perf_counter() - start
    for i, s in enumerate(samplers):
        s.close()
        engine.forget(i, 0)
    return n * tokens / elapsed, first


def one_stream(stub, prompt: str, tokens: int, out: list, index: int) -> None:
    start = time.perf_counter()
    first = 0.0
    got = 0
    request = pb.GenerateRequest(model="bench", prompt=prompt, options=pb.SamplingOptions(max_tokens=tokens, temperature=0))
    for chunk in stub.Generate(request):
        if chunk.tokens and not first:
            first = time.perf_counter() - start
        got += chunk.tokens
    assert got == tokens, f"asked for {tokens} tokens, got {got}"
    out[index] = (first, time.perf_counter())


def through_daemon(stub, n: int, tokens: int) -> tuple[float, float]:
    results: list = [None] * n
    threads = [threading.Thread(target=one_stream, args=(stub, PROMPTS[i % len(PROMPTS)], tokens, results, i))
               for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(r[1] for r in results)
    return n * tokens / (end - start), statistics.median(r[0] for r in results)


def ttft_beside(stub, others: int, tokens: int) -> float:
    """Time to first token of a short request sent while `others` streams are under way."""
    stop = threading.Event()
    started = threading.Barrier(others + 1)

    def background(i: int) -> None:
        request = pb.GenerateRequest(model="bench", prompt=PROMPTS[i], options=pb.SamplingOptions(max_tokens=tokens * 4, temperature=0))
        call = stub.Generate(request)
        first = True
        for _ in call:
            if first:
                started.wait()
                first = False
            if stop.is_set():
                call.cancel()
                break

    threads = [threading.Thread(target=background, args=(i,)) for i in range(others)]
    for t in threads:
        t.start()
    if others:
        started.wait()
    result: list = [None]
    one_stream(stub, "hello", 4, result, 0)
    stop.set()
    for t in threads:
        t.join()
    return result[0][0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttft-rounds", type=int, default=7)
    parser.add_argument("--only-ttft", action="store_true", help="skip the throughput levels")
    args = parser.parse_args()
    parallel = max(args.levels)
    n_ctx = 4096
    threads = default_threads()
    settings = f'n_ctx = {n_ctx}\nn_threads = {threads}\nparallel = {parallel}\nkeep_alive = "1h"'
    with bench_daemon(settings) as (model, stub):
        engine = LlamaEngine()
        engine.load(str(model), {"n_ctx": n_ctx, "n_batch": 512, "n_threads": threads, "parallel": parallel})
        levels = {}
        for n in ([] if args.only_ttft else args.levels):
            engine_ceiling(engine, n, 8), through_daemon(stub, n, 8)  # warm both
            runs: dict[str, list] = {"engine": [], "supervisor": []}
            for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
                runs["engine"].append(engine_ceiling(engine, n, args.tokens))
                runs["supervisor"].append(through_daemon(stub, n, args.tokens))
            med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
            levels[str(n)] = {"engine_tok_s": round(med["engine"][0], 1), "supervisor_tok_s": round(med["supervisor"][0], 1),
                              "ratio_to_engine": round(med["supervisor"][0] / med["engine"][0], 3),
                              "engine_ttft_ms": round(med["engine"][1] * 1000, 1),
                              "supervisor_ttft_ms": round(med["supervisor"][1] * 1000, 1)}
        engine.close()
        one = levels.get("1", {}).get("supervisor_tok_s")
        for figures in levels.values():
            if one:
                figures["speedup_over_one_stream"] = round(figures["supervisor_tok_s"] / one, 2)
        alone, beside = [], []
        for _ in range(args.ttft_rounds):  # alternate, as above
            alone.append(ttft_beside(stub, 0, args.tokens))
            beside.append(ttft_beside(stub, 3, args.tokens))
        alone, beside = statistics.median(alone), statistics.median(beside)
        print(json.dumps({"benchmark": "concurrency", "model_bytes": model.stat().st_size, "n_threads": threads,
                          "parallel": parallel, "tokens": args.tokens, "rounds": args.rounds, "levels": levels,
                          "short_request_ttft_ms": {"alone": round(alone * 1000, 1), "beside_3_streams": round(beside * 1000, 1),
                                                    "ratio": round(beside / alone, 2)}}, indent=2))


if __name__ == "__main__":
    main()
