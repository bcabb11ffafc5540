"""Streaming through the supervisor against llama-cpp-python's own generate() loop, side by side.

    .venv/bin/python bench/streaming.py [--lengths 64 512 2048] [--rounds 3] [--one-token-rounds 50]

Generates a ~100 MB f32 llama GGUF, then for each output length alternates: the bare engine in this
process (Llama.generate(), same n_threads, greedy), a Generate stream through llm-supervisord and its
worker process over real unix-socket gRPC, the same over HTTP as OpenAI's server-sent events
(/v1/completions) and as Ollama's NDJSON (/api/generate, raw). Prints one JSON object: tokens/s and time
to first token of each, the median over rounds, and each one's ratio to the engine. Targets: every ratio
>= 0.95. Then the median time of a 1-token request over gRPC and over each HTTP API, alternated, and the
HTTP one's extra cost (target <= 1 ms).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._daemon import bench_daemon, free_port  # noqa: E402
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


def over_http(conn: http.client.HTTPConnection, n: int, sse: bool) -> tuple[float, float]:
    """The same stream over HTTP on a kept-alive connection: OpenAI's SSE or Ollama's NDJSON."""
    if sse:
        path, body = "/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                         "stream": True, "stream_options": {"include_usage": True}}
    else:
        path, body = "/api/generate", {"model": "bench", "prompt": PROMPT, "raw": True,
                                       "options": {"num_predict": n, "temperature": 0}}
    start = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = 0.0
    tokens = 0
    for line in response:
        line = line.strip()
        if not line or line == b"data: [DONE]":
            continue
        frame = json.loads(line.removeprefix(b"data: "))
        text = frame["choices"][0]["text"] if sse and frame["choices"] else frame.get("response", "")
        if text and not first:
            first = time.perf_counter()
        tokens = (frame.get("usage") or {}).get("completion_tokens", 0) if sse else frame.get("eval_count", tokens)
    end = time.perf_counter()
    assert tokens == n, f"asked for {n} tokens, got {tokens}"
    return (tokens - 1) / (end - first), first - start


def one_token(stub, conn: http.client.HTTPConnection, rounds: int) -> dict:
    """Median seconds of a 1-token request: gRPC Generate, /v1/completions and /api/generate (raw)."""
    def grpc_call() -> None:
        list(stub.Generate(pb.GenerateRequest(model="bench", prompt=PROMPT,
                                              options=pb.SamplingOptions(max_tokens=1, temperature=0))))

    def http_call(path: str, body: dict) -> None:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    calls = {"grpc": grpc_call,
             "openai": lambda: http_call("/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": 1,
                                                             "temperature": 0}),
             "ollama": lambda: http_call("/api/generate", {"model": "bench", "prompt": PROMPT, "raw": True,
                                                           "stream": False,
                                                           "options": {"num_predict": 1, "temperature": 0}})}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():  # alternated: drift on a shared machine hits all alike
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"grpc_ms": round(med["grpc"] * 1000, 3), "openai_ms": round(med["openai"] * 1000, 3),
            "ollama_ms": round(med["ollama"] * 1000, 3),
            "openai_extra_ms": round((med["openai"] - med["grpc"]) * 1000, 3),
            "ollama_extra_ms": round((med["ollama"] - med["grpc"]) * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-interval", default="50ms", help="the model's stream_interval")
    parser.add_argument("--one-token-rounds", type=int, default=50)
    args = parser.parse_args()
    n_ctx = max(args.lengths) + 256
    threads = default_threads()

    settings = f'n_ctx = {n_ctx}\nn_threads = {threads}\nstream_interval = "{args.stream_interval}"'
    port = free_port()
    with bench_daemon(settings, http_port=port) as (model, stub):
        from llama_cpp import Llama

        llama = Llama(str(model), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        ways = {"engine": lambda n: bare(llama, n), "supervisor": lambda n: through_supervisor(stub, n),
                "sse": lambda n: over_http(conn, n, sse=True), "ndjson": lambda n: over_http(conn, n, sse=False)}
        results = {}
        for n in args.lengths:
            for way in ways.values():
                way(8)  # warm each
            runs = {k: [] for k in ways}
            for _ in range(args.rounds):  # alternate, so drift on a shared machine hits all alike
                for name, way in ways.items():
                    runs[name].append(way(n))
            med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
            results[str(n)] = {
                **{f"{k}_tok_s": round(med[k][0], 1) for k in ways},
                "ratio": round(med["supervisor"][0] / med["engine"][0], 3),
                "sse_ratio": round(med["sse"][0] / med["engine"][0], 3),
                "ndjson_ratio": round(med["ndjson"][0] / med["engine"][0], 3),
                **{f"{k}_ttft_ms": round(med[k][1] * 1000, 2) for k in ways},
            }
        print(json.dumps({"benchmark": "streaming", "model_bytes": model.stat().st_size, "n_threads": threads,
                          "stream_interval": args.stream_interval,
                          "rounds": args.rounds, "lengths": results,
                          "one_token": one_token(stub, conn, args.one_token_rounds)}, indent=2))


if __name__ == "__main__":
    main()
