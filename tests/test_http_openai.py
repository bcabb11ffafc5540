"""The OpenAI-compatible API with the official `openai` package, unchanged, against a live daemon."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import HTTP, launch, model_table

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def daemon(http_daemon):
    return http_daemon


@pytest.fixture
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.http_url}/v1", api_key="not-needed", max_retries=0)


def grpc_chat(daemon, max_tokens: int) -> str:
    messages = [pb.ChatMessage(**m) for m in MESSAGES]
    chunks = daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages,
                                             options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0.0)))
    return "".join(c.text for c in chunks)


def test_models_list_names_every_loaded_model(client):
    assert sorted(m.id for m in client.models.list()) == ["emb", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_completion_matches_the_grpc_chat_and_reports_usage(daemon, client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == grpc_chat(daemon, 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_chat_with_usage_is_the_same_text(daemon, client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == grpc_chat(daemon, 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_without_usage_has_none(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_completion_matches_grpc_generate(daemon, client):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    expected = "".join(c.text for c in daemon.stub.Generate(pb.GenerateRequest(
        model="tiny", prompt="Once upon a time", options=pb.SamplingOptions(max_tokens=10, temperature=0.0))))
    assert reply.choices[0].text == expected and reply.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == expected


def test_response_format_json_object_parses(client):
    # Sampled, seeded: greedy decoding of random weights loops inside a string until max_tokens.
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300, temperature=0.8, seed=1,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_response_format_json_schema_is_followed(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=100, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}})
    assert json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")


def test_embeddings_as_the_openai_package_asks_for_them(client, daemon):
    reply = client.embeddings.create(model="emb", input=["hello world", "goodbye"])  # base64, decoded by the package
    assert [d.index for d in reply.data] == [0, 1]
    grpc_reply = daemon.stub.Embed(pb.EmbedRequest(model="emb", input=["hello world", "goodbye"]))
    for ours, theirs in zip(reply.data, grpc_reply.embeddings):
        assert ours.embedding == pytest.approx(list(theirs.values), abs=1e-6)
    assert reply.usage.prompt_tokens == grpc_reply.prompt_tokens
    floats = client.embeddings.create(model="emb", input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)


@pytest.mark.parametrize("extra", [{"max_tokens": 10**10}, {"extra_body": {"top_k": 2**40}},
                                   {"temperature": 1000}, {"stop": ["a"] * 17}, {"seed": -(2**70)}])
def test_values_out_of_range_are_bad_requests_never_server_errors(client, extra):
    if "seed" in extra:  # any integer seed is taken (modulo 2**32), as OpenAI's are 64-bit
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **extra).usage
        return
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=extra.pop("max_tokens", 2), **extra)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert "unknown model 'nope'" in e.value.message and e.value.code == "model_not_found"


@pytest.mark.parametrize("extra, field", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")])
def test_what_is_not_supported_is_refused_by_name(client, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **extra)
    assert e.value.status_code == 400 and e.value.param == field and field in e.value.message


def test_chat_on_an_embedding_model_and_embeddings_of_a_chat_model_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="emb", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="embedding = true"):
        client.embeddings.create(model="tiny", input="hello")


def test_a_missing_or_wrong_token_is_refused(model_dir, tmp_path):
    tokens = tmp_path / "inference.tokens"
    tokens.write_text("inference-token-0123456789\n")
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512),
                    extra=HTTP + f'[auth]\ninference_tokens_file = "{tokens}"\n')
    try:
        url = f"{daemon.http_url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong-token-0123456789", max_retries=0).models.list()
        with pytest.raises(openai.AuthenticationError):  # the package always sends a key: none, by hand
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0).models.list(
                extra_headers={"Authorization": ""})
        good = openai.OpenAI(base_url=url, api_key="inference-token-0123456789", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(grpc.RpcError):  # the gRPC API holds to the same tokens
            daemon.stub.ListModels(pb.ListModelsRequest())
    finally:
        daemon.stop()
