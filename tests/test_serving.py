"""The serving path through a real daemon, a real worker process and real llama.cpp."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_supervisor.v1 import supervisor_pb2 as pb

FINISH = pb.FinishReason


def generate(daemon, prompt="hello world", model="tiny", **options):
    return list(daemon.stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, options=pb.SamplingOptions(**options))))


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_generate_streams_text_and_ends_with_usage(shared_daemon):
    chunks = generate(shared_daemon, max_tokens=48, temperature=0.0)
    last = chunks[-1]
    assert last.finish_reason == FINISH.FINISH_REASON_LENGTH
    assert all(c.finish_reason == FINISH.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    prompt_tokens = shared_daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello world", add_special=True)).count
    assert last.usage.prompt_tokens == prompt_tokens
    assert last.usage.completion_tokens == 48
    assert sum(c.tokens for c in chunks) == 48  # every token is accounted for, in some chunk
    assert text_of(chunks).strip()
    assert last.timings.time_to_first_token_s > 0
    assert last.timings.tokens_per_second > 0
    assert last.timings.total_s >= last.timings.time_to_first_token_s
    assert last.model == "tiny" and last.worker_pid == shared_daemon.worker("tiny").pid


def test_same_seed_same_text_and_prefix_reused(shared_daemon):
    first = generate(shared_daemon, prompt="the model is a worker", max_tokens=32, temperature=0.9, seed=7)
    second = generate(shared_daemon, prompt="the model is a worker", max_tokens=32, temperature=0.9, seed=7)
    assert text_of(first) == text_of(second)
    # The second request found the prompt in the KV cache from the first (all but the last token).
    assert second[-1].usage.cached_prompt_tokens == second[-1].usage.prompt_tokens - 1


def test_stop_sequence_ends_before_the_match(shared_daemon):
    full = text_of(generate(shared_daemon, max_tokens=64, temperature=0.0))
    stop = full[20:24]
    cut = generate(shared_daemon, max_tokens=64, temperature=0.0, stop=[stop, "never appears"])
    assert cut[-1].finish_reason == FINISH.FINISH_REASON_STOP
    assert text_of(cut) == full[: full.index(stop)]


def test_chat_uses_the_template_and_streams(shared_daemon):
    messages = [pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="user", content="hi there")]
    chunks = list(shared_daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages,
                                                         options=pb.SamplingOptions(max_tokens=16, temperature=0))))
    last = chunks[-1]
    assert last.usage.completion_tokens == 16
    content_only = shared_daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="be brief hi there", add_special=True))
    # The template wraps each message in role markers, so the prompt is longer than the contents alone.
    assert last.usage.prompt_tokens > content_only.count + 10


def test_tokenize_counts_and_reports_the_context(shared_daemon):
    with_bos = shared_daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello", add_special=True))
    without = shared_daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny", text="hello"))
    assert with_bos.count == without.count + 1 == len(with_bos.tokens)
    assert with_bos.n_ctx == 512


@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, ["'nope'", "tiny"]),
        (pb.GenerateRequest(model="", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, ["model is empty"]),
        (pb.GenerateRequest(model="tiny", prompt=""), grpc.StatusCode.INVALID_ARGUMENT, ["prompt is empty"]),
        (pb.GenerateRequest(model="tiny", prompt="the " * 400), grpc.StatusCode.INVALID_ARGUMENT, ["1602 tokens", "512"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=600)),
         grpc.StatusCode.INVALID_ARGUMENT, ["max_tokens (600)", "512", "at most 508"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(temperature=float("nan"))),
         grpc.StatusCode.INVALID_ARGUMENT, ["temperature", "nan"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(top_p=1.5)),
         grpc.StatusCode.INVALID_ARGUMENT, ["top_p", "between 0 and 1"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(repeat_penalty=0)),
         grpc.StatusCode.INVALID_ARGUMENT, ["repeat_penalty"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(stop=[""])),
         grpc.StatusCode.INVALID_ARGUMENT, ["stop sequence cannot be empty"]),
        (pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(stop=["x"] * 17)),
         grpc.StatusCode.INVALID_ARGUMENT, ["at most 16 stop"]),
    ],
    ids=["unknown-model", "empty-model", "empty-prompt", "prompt-too-long", "max-tokens-past-context",
         "nan-temperature", "top-p", "repeat-penalty", "empty-stop", "too-many-stops"],
)
def test_bad_generate_requests_get_clear_statuses(shared_daemon, request_, code, words):
    with pytest.raises(grpc.RpcError) as caught:
        list(shared_daemon.stub.Generate(request_))
    assert caught.value.code() == code
    for word in words:
        assert word in caught.value.details()


@pytest.mark.parametrize(
    "messages, words",
    [([], ["messages is empty"]),
     ([pb.ChatMessage(role="wizard", content="hi")], ["role", "wizard"]),
     ([pb.ChatMessage(role="user", content="")], ["empty"])],
    ids=["no-messages", "bad-role", "empty-content"],
)
def test_bad_chat_requests_get_invalid_argument(shared_daemon, messages, words):
    with pytest.raises(grpc.RpcError) as caught:
        list(shared_daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in caught.value.details()


def test_status_lists_the_worker_with_its_private_memory(shared_daemon):
    generate(shared_daemon, max_tokens=4)
    worker = shared_daemon.worker("tiny")
    assert worker.state == "READY"
    assert worker.pid > 0
    assert worker.requests_served >= 1
    assert worker.uptime_s > 0
    # Private (anonymous) memory is the runtime and KV cache; the mmap'd weights are file pages.
    assert worker.private_memory_bytes > 10 << 20
    assert worker.file_rss_bytes > 0
    model = shared_daemon.stub.ListModels(pb.ListModelsRequest()).models[0]
    assert (model.name, model.architecture, model.source, model.use_mmap) == ("tiny", "llama", "config", True)
    assert model.has_chat_template


def test_health_overall_and_per_model(shared_daemon):
    for service in ("", "llm_supervisor.v1.Supervisor", "model/tiny"):
        reply = shared_daemon.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        shared_daemon.health.Check(health_pb2.HealthCheckRequest(service="model/nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(shared_daemon):
    stub = reflection_pb2_grpc.ServerReflectionStub(shared_daemon.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"llm_supervisor.v1.Supervisor", "grpc.health.v1.Health"} <= names
