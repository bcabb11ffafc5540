"""The worker's servicer through grpcio-testing: no process, no socket, a fake engine."""

from __future__ import annotations

import itertools
import threading
import types

import grpc
import grpc_testing
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2
from worker.engine import EngineError, EngineInfo
from worker.service import WorkerService

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]


class CharEngine:
    """One token per character; every sequence repeats the letters of 'abc' forever."""

    def __init__(self) -> None:
        self.ended = 0
        self.trimmed = threading.Event()

    def tokenize(self, text, add_special):
        return ([0] if add_special else []) + [ord(c) for c in text]

    def chat_prompt(self, messages):
        if any(m["role"] == "tool" for m in messages):
            raise EngineError("the model's chat template refused these messages: no tools")
        return self.tokenize("".join(f"<{m['role']}>{m['content']}" for m in messages), True)

    def token_bytes(self, token):
        return chr(token).encode()

    def control_tokens(self, texts):
        return frozenset()

    def is_end_of_generation(self, token):
        return False

    def sampler(self, sampling):
        if sampling.grammar.startswith("broken"):
            raise EngineError("the grammar does not parse")
        letters = itertools.cycle((ord("a"), ord("b"), ord("c")))
        return types.SimpleNamespace(sample=lambda index: next(letters), close=lambda: None)

    def decode(self, chunks):
        pass

    def forget(self, seq, keep):
        return keep

    def share(self, source, seq, n):
        return n

    def after_request(self):
        self.ended += 1

    def idle(self):
        self.trimmed.set()


def service_of(engine, n_ctx=64, **kwargs) -> WorkerService:
    info = EngineInfo(n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, architecture="fake", has_chat_template=True, parallel=2)
    return WorkerService("fake", engine, info, **kwargs)


@pytest.fixture
def worker():
    engine = CharEngine()
    service = service_of(engine)
    server = grpc_testing.server_from_dictionary({SERVICE: service}, grpc_testing.strict_real_time())
    yield server, engine
    service.close()


def generate(server, request):
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Generate"], (), request, None)
    chunks = []
    while True:
        try:
            chunks.append(rpc.take_response())
        except ValueError:  # no more responses: the RPC terminated
            break
    _, code, details = rpc.termination()
    return chunks, code, details


def test_stream_ends_with_usage_and_trims_the_heap(worker):
    server, engine = worker
    chunks, code, _ = generate(server, worker_pb2.WorkerGenerateRequest(
        prompt="hey", options=pb.SamplingOptions(max_tokens=7, stop=["zz"])))
    assert code == grpc.StatusCode.OK
    assert "".join(c.text for c in chunks) == "abcabca"
    last = chunks[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 7)
    assert last.finish_reason == pb.FinishReason.FINISH_REASON_LENGTH
    assert sum(c.tokens for c in chunks) == 7
    assert engine.ended == 1
    assert engine.trimmed.wait(10)  # malloc_trim once nothing runs


def test_prompt_longer_than_the_context_names_both_numbers(worker):
    server, _ = worker
    _, code, details = generate(server, worker_pb2.WorkerGenerateRequest(prompt="x" * 80))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "81 tokens" in details and "64 tokens" in details


def test_chat_template_refusal_is_invalid_argument(worker):
    server, _ = worker
    chat = pb.ChatRequest(messages=[pb.ChatMessage(role="tool", content="{}")])
    _, code, details = generate(server, worker_pb2.WorkerGenerateRequest(chat=chat))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no tools" in details


def test_info_reports_the_context(worker):
    server, _ = worker
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["Info"], (), worker_pb2.WorkerInfoRequest(), None)
    info, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK and (info.n_ctx, info.architecture) == (64, "fake")


def test_a_generating_worker_refuses_embed_naming_the_setting(worker):
    server, _ = worker
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["Embed"], (), pb.EmbedRequest(input=["hi"]), None)
    _, _, code, details = rpc.termination()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "`embedding = true` in [models.fake]" in details


def test_messages_coalesce_within_the_stream_interval_without_delaying_the_end():
    service = service_of(CharEngine(), stream_interval=30.0)
    server = grpc_testing.server_from_dictionary({SERVICE: service}, grpc_testing.strict_real_time())
    chunks, code, _ = generate(server, worker_pb2.WorkerGenerateRequest(prompt="hey", options=pb.SamplingOptions(max_tokens=40)))
    service.close()
    assert code == grpc.StatusCode.OK
    # The first piece goes out at once; the other 39 tokens wait for the interval or the end, whichever is first.
    assert len(chunks) <= 2
    assert "".join(c.text for c in chunks) == ("abc" * 14)[:40]
    assert chunks[-1].timings.total_s < 30


def test_a_grammar_the_engine_refuses_and_a_schema_that_does_not_convert_are_invalid_argument(worker):
    server, _ = worker
    _, code, details = generate(server, worker_pb2.WorkerGenerateRequest(
        prompt="hey", options=pb.SamplingOptions(grammar="broken ::=")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "grammar does not parse" in details
    _, code, details = generate(server, worker_pb2.WorkerGenerateRequest(
        prompt="hey", options=pb.SamplingOptions(json_schema='{"type": "no such type"}')))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in details


def test_info_reports_the_pool(worker):
    server, _ = worker
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["Info"], (), worker_pb2.WorkerInfoRequest(), None)
    info, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert (info.parallel, info.pool.parallel, info.pool.n_ctx, info.pool.sequences_active) == (2, 2, 64, 0)


def test_released_answers_at_once_for_a_request_it_does_not_hold_even_without_a_deadline(worker):
    server, _ = worker
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["Released"], (), worker_pb2.ReleasedRequest(request_id=42), None)
    reply, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK and reply.freed
