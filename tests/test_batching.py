"""Continuous batching through a real daemon, real workers and real llama.cpp: many requests share one
worker and its one KV pool, and each sees what it would alone."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import model_table, wait_for

SLOW = "tests.engines:SlowEngine"


def tiny(**options) -> str:
    return model_table("tiny", "tiny.gguf", **{"n_ctx": 1024, "parallel": 4, **options})


def request(daemon, prompt="hello world", **options):
    return daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt=prompt,
                                                   options=pb.SamplingOptions(**{"temperature": 0.0, **options})))


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


class Stream(threading.Thread):
    """One client's stream in a thread: its chunks with their arrival times, or the error that ended it."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.chunks: list = []
        self.times: list[float] = []
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            for chunk in self.call:
                self.times.append(time.monotonic())
                self.chunks.append(chunk)
        except grpc.RpcError as e:
            self.error = e

    def result(self, timeout: float = 120):
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        return self.chunks

    def tokens_between(self, start: float, end: float) -> int:
        return sum(c.tokens for c, t in zip(self.chunks, self.times) if start <= t <= end)


def pool(daemon) -> pb.PoolStatus:
    return daemon.worker("tiny").pool


PROMPTS = ["hello world", "the model is a worker", "one two three four", "memory leak cache context"]


def test_four_streams_run_at_once_in_one_worker_and_each_gets_all_its_tokens(start_daemon):
    daemon = start_daemon(tiny(engine=SLOW), env={"TEST_TOKEN_DELAY": "0.01"})
    streams = [Stream(request(daemon, prompt, max_tokens=100)) for prompt in PROMPTS]
    wait_for(lambda: pool(daemon).sequences_active == 4, 30, what="four sequences at once")
    status = pool(daemon)
    assert (status.parallel, status.n_ctx) == (4, 1024) and status.cells_used > 0
    for stream in streams:
        chunks = stream.result()
        assert stream.error is None
        assert chunks[-1].usage.completion_tokens == 100 and sum(c.tokens for c in chunks) == 100
    assert len({s.chunks[-1].worker_pid for s in streams}) == 1  # one worker served all four
    wait_for(lambda: pool(daemon).sequences_active == 0, 10, what="the pool to empty")


def test_greedy_text_is_the_same_alone_and_beside_three_others(start_daemon):
    daemon = start_daemon(tiny())
    alone = [text_of(request(daemon, prompt, max_tokens=64)) for prompt in PROMPTS]
    together = [Stream(request(daemon, prompt, max_tokens=64)) for prompt in PROMPTS]
    assert [text_of(s.result()) for s in together] == alone


def test_a_long_prompt_arriving_delays_running_streams_by_one_chunk_at_most(start_daemon):
    # 20 ms a step; the ~1,500-token prompt takes ~12 chunks of n_batch = 128 tokens. A worker that
    # evaluated it in one go would give the three running streams no token meanwhile.
    daemon = start_daemon(tiny(engine=SLOW, n_ctx=4096, n_batch=128, stream_interval="0s"),
                          env={"TEST_TOKEN_DELAY": "0.02"})
    running = [Stream(request(daemon, prompt, max_tokens=400)) for prompt in PROMPTS[:3]]
    wait_for(lambda: all(s.chunks for s in running), 30, what="three streams to run")
    sent = time.monotonic()
    long = Stream(request(daemon, " ".join(["the model is a worker"] * 70), max_tokens=1))
    chunks = long.result()
    assert long.error is None, long.error
    first_token = long.times[0]
    steps = chunks[-1].usage.prompt_tokens // 128
    assert steps >= 10
    for stream in running:
        # One token per step while the prompt goes through in chunks (less the steps a chunk straddles).
        assert stream.tokens_between(sent, first_token) >= steps - 2
    for stream in running:
        assert stream.result()[-1].usage.completion_tokens == 400


def test_cancel_frees_the_sequence_during_its_prompt_and_during_generation_and_spares_the_others(start_daemon):
    daemon = start_daemon(tiny(engine=SLOW, n_ctx=4096, n_batch=64), env={"TEST_TOKEN_DELAY": "0.05"})
    others = [Stream(request(daemon, prompt, max_tokens=200)) for prompt in PROMPTS[:2]]
    wait_for(lambda: pool(daemon).sequences_active == 2, 30, what="two streams")
    # During its prompt: ~2,100 tokens at 62 a step of 50 ms or more is 1.7 s of prompt at least.
    in_prompt = Stream(request(daemon, " ".join(["the model is a worker"] * 100), max_tokens=5))
    wait_for(lambda: pool(daemon).sequences_active == 3, 10, what="the long prompt to start")
    cells_with_it = pool(daemon).cells_used
    cancelled_at = time.monotonic()
    in_prompt.call.cancel()
    wait_for(lambda: pool(daemon).sequences_active == 2, 10, interval=0.01, what="the cancelled prompt's sequence to go")
    assert time.monotonic() - cancelled_at < 1.0  # well before its prompt would have finished
    assert pool(daemon).cells_used < cells_with_it
    in_prompt.result()
    assert in_prompt.error.code() == grpc.StatusCode.CANCELLED and not in_prompt.chunks
    # During generation.
    generating = Stream(request(daemon, "hello", max_tokens=1000))
    wait_for(lambda: generating.chunks, 30, what="the third stream's first tokens")
    generating.call.cancel()
    wait_for(lambda: pool(daemon).sequences_active == 2, 10, interval=0.01, what="the cancelled stream's sequence to go")
    for stream in others:
        assert stream.result()[-1].usage.completion_tokens == 200
    wait_for(lambda: pool(daemon).sequences_active == 0, 10, what="the pool to empty")


def test_a_pool_too_small_for_four_preempts_and_resumes_with_no_error_gap_or_repeat(start_daemon):
    # 256 cells: each request needs ~205 alone, four need ~820.
    daemon = start_daemon(tiny(n_ctx=256, n_batch=64))
    alone = [text_of(request(daemon, prompt, max_tokens=200)) for prompt in PROMPTS]
    streams = [Stream(request(daemon, prompt, max_tokens=200)) for prompt in PROMPTS]
    results = [s.result() for s in streams]
    assert [s.error for s in streams] == [None] * 4
    assert [c[-1].usage.completion_tokens for c in results] == [200] * 4
    assert [text_of(c) for c in results] == alone  # greedy: any gap or repeat would show
    assert pool(daemon).preemptions > 0


def test_a_second_chat_turn_reuses_the_first_turns_cells(start_daemon):
    daemon = start_daemon(tiny())
    first_messages = [pb.ChatMessage(role="user", content="hello there, model")]
    first = list(daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=first_messages,
                                                 options=pb.SamplingOptions(max_tokens=20, temperature=0))))
    second_messages = first_messages + [pb.ChatMessage(role="assistant", content=text_of(first)),
                                        pb.ChatMessage(role="user", content="and then?")]
    second = list(daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=second_messages,
                                                  options=pb.SamplingOptions(max_tokens=20, temperature=0))))
    assert second[-1].usage.cached_prompt_tokens >= first[-1].usage.prompt_tokens
    assert pool(daemon).sequences_cached >= 1


def test_penalties_change_what_a_sequence_samples_and_only_that_sequence(start_daemon):
    daemon = start_daemon(tiny())
    plain = text_of(request(daemon, "hello world", max_tokens=64))
    penalised = {name: text_of(request(daemon, "hello world", max_tokens=64, **{name: value}))
                 for name, value in (("frequency_penalty", 1.5), ("presence_penalty", 1.5), ("repeat_penalty", 1.5))}
    assert all(text != plain for text in penalised.values()), penalised  # greedy text repeats itself
    # Beside each other, each sequence keeps its own penalties' history.
    together = [Stream(request(daemon, "hello world", max_tokens=64, **({name: 1.5} if name else {})))
                for name in ("frequency_penalty", "presence_penalty", "repeat_penalty", None)]
    assert [text_of(s.result()) for s in together] == [*penalised.values(), plain]
    with pytest.raises(grpc.RpcError) as refused:
        text_of(request(daemon, "x", frequency_penalty=3.0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frequency_penalty" in refused.value.details()


def test_grammar_and_json_schema_constrain_the_output(start_daemon):
    daemon = start_daemon(tiny())
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    for seed in range(3):
        out = json.loads(text_of(request(daemon, "answer in json", max_tokens=200, temperature=1.0, seed=seed,
                                         json_schema=json.dumps(schema))))
        assert set(out) == {"ok", "color"} and isinstance(out["ok"], bool) and out["color"] in ("red", "green", "blue")
        answer = text_of(request(daemon, "yes or no?", max_tokens=10, temperature=1.0, seed=seed,
                                 grammar='root ::= ("yes" | "no") "."'))
        assert answer in ("yes.", "no.")
    chat = list(daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="json")],
                                                options=pb.SamplingOptions(max_tokens=200, json_schema=json.dumps(schema)))))
    assert set(json.loads(text_of(chat))) == {"ok", "color"}
    with pytest.raises(grpc.RpcError) as refused:
        text_of(request(daemon, "x", grammar="root ::= ("))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grammar" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        text_of(request(daemon, "x", grammar="root ::= \"a\"", json_schema="{}"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in refused.value.details()


def test_kill_9_mid_batch_fails_exactly_the_streams_in_flight_and_queued_ones_run_on_the_fresh_worker(start_daemon):
    daemon = start_daemon(tiny(engine=SLOW, parallel=2), env={"TEST_TOKEN_DELAY": "0.02"})
    pid = daemon.worker("tiny").pid
    in_flight = [Stream(request(daemon, prompt, max_tokens=1000)) for prompt in PROMPTS[:2]]
    wait_for(lambda: all(s.chunks for s in in_flight), 30, what="two streams under way")
    queued = [Stream(request(daemon, prompt, max_tokens=20)) for prompt in PROMPTS[2:]]
    wait_for(lambda: daemon.worker("tiny").queue_depth == 2, 10, what="two requests queued")
    os.kill(pid, signal.SIGKILL)
    for stream in in_flight:
        stream.result()
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "SIGKILL" in stream.error.details() and str(pid) in stream.error.details()
    for stream in queued:
        chunks = stream.result()
        assert stream.error is None and chunks[-1].usage.completion_tokens == 20
        assert chunks[-1].worker_pid not in (0, pid)


def test_parallel_1_serves_one_request_at_a_time(start_daemon):
    daemon = start_daemon(tiny(engine=SLOW, parallel=1), env={"TEST_TOKEN_DELAY": "0.01"})
    streams = [Stream(request(daemon, prompt, max_tokens=40)) for prompt in PROMPTS[:2]]
    wait_for(lambda: pool(daemon).sequences_active == 1 and daemon.worker("tiny").queue_depth == 1, 30,
             what="one running, one queued")
    first, second = (s.result() for s in streams)
    assert first[-1].usage.completion_tokens == second[-1].usage.completion_tokens == 40
    assert pool(daemon).parallel == 1


def test_a_graceful_recycle_drains_every_sequence_and_says_how_many(start_daemon):
    daemon = start_daemon(tiny(engine=SLOW), env={"TEST_TOKEN_DELAY": "0.02"})
    old = daemon.worker("tiny").pid
    streams = [Stream(request(daemon, prompt, max_tokens=60)) for prompt in PROMPTS[:3]]
    wait_for(lambda: pool(daemon).sequences_active == 3, 30, what="three sequences")
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny"))
    for stream in streams:
        chunks = stream.result()
        assert stream.error is None and chunks[-1].usage.completion_tokens == 60 and chunks[-1].worker_pid == old
    (recycle,) = [e for e in map(json.loads, daemon.log().splitlines()) if e.get("event") == "worker_recycle"]
    assert recycle["draining_sequences"] == 3 and recycle["worker_pid"] == old
    assert daemon.worker("tiny").pid != old


def test_a_cancelled_request_keeps_its_place_until_the_worker_has_freed_its_sequence(start_daemon):
    # parallel = 1 and a second a step: the cancel lands at the start of a step the worker must finish.
    daemon = start_daemon(tiny(engine=SLOW, parallel=1), env={"TEST_TOKEN_DELAY": "1.0"})
    first = Stream(request(daemon, "hello", max_tokens=100))
    wait_for(lambda: first.chunks, 30, what="the first token")
    first.call.cancel()
    second = Stream(request(daemon, "world", max_tokens=1))
    # The worker still computes the cancelled sequence's step: the second request waits in the
    # supervisor's queue meanwhile, not inside the worker beside a sequence it was never counted with.
    wait_for(lambda: daemon.worker("tiny").queue_depth == 1, 0.9, interval=0.01, what="the second to wait its turn")
    assert second.result()[-1].usage.completion_tokens == 1
    assert first.error.code() == grpc.StatusCode.CANCELLED
