"""The Ollama-compatible API with the official `ollama` package, unchanged, against a live daemon."""

from __future__ import annotations

import json
import time

import ollama
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.demo_model import write_model
from tests.conftest import HTTP, launch, model_table, wait_for

MESSAGES = [{"role": "user", "content": "Say hello"}]
GREEDY = {"num_predict": 10, "temperature": 0}


@pytest.fixture(scope="module")
def daemon(http_daemon):
    return http_daemon


@pytest.fixture
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.http_url)


def grpc_chat(daemon, messages, max_tokens: int, model: str = "tiny") -> str:
    chunks = daemon.stub.Chat(pb.ChatRequest(model=model, messages=[pb.ChatMessage(**m) for m in messages],
                                             options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0.0)))
    return "".join(c.text for c in chunks)


def test_list_names_models_with_their_tag_and_details(client):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"tiny:latest", "emb:latest"}
    tiny = models["tiny:latest"]
    assert tiny.details.family == "llama" and tiny.details.format == "gguf"
    assert tiny.details.quantization_level == "F32" and tiny.size > 0


def test_show_reads_the_gguf_header(client, daemon):
    shown = client.show("tiny")
    assert shown.details.family == "llama"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] > 0
    assert "message['role']" in shown.template  # the GGUF's own chat template
    assert "num_ctx 1024" in shown.parameters  # what this daemon runs it with
    assert client.show("tiny:latest").modelinfo == shown.modelinfo


def test_chat_and_generate_match_grpc_streaming_or_not(client, daemon):
    expected = grpc_chat(daemon, MESSAGES, 10)
    reply = client.chat(model="tiny", messages=MESSAGES, options=GREEDY)
    assert reply.message.role == "assistant" and reply.message.content == expected
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 10
    assert reply.prompt_eval_count > 0 and reply.total_duration >= reply.eval_duration > 0
    parts = list(client.chat(model="tiny:latest", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    # /api/generate: the prompt is the user's turn in the chat template, as in Ollama.
    generated = client.generate(model="tiny", prompt="Say hello", options=GREEDY)
    assert generated.response == expected and generated.eval_count == 10
    streamed = list(client.generate(model="tiny", prompt="Say hello", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == expected and streamed[-1].done_reason == "length"


def test_think_on_a_model_that_does_not_think_leaves_the_reply_whole(client, daemon):
    reply = client.chat(model="tiny", messages=MESSAGES, options=GREEDY, think=True)
    assert reply.message.content == grpc_chat(daemon, MESSAGES, 10) and not reply.message.thinking
    parts = list(client.chat(model="tiny", messages=MESSAGES, options=GREEDY, think=True, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content


# A template whose generation prompt opens the reasoning, as DeepSeek-R1's newer ones and QwQ's do.
THINKER = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")


def test_think_puts_a_thinking_models_reasoning_in_thinking(tmp_path):
    write_model(tmp_path / "thinker.gguf", chat_template=THINKER)
    daemon = launch(tmp_path, model_table("thinker", "thinker.gguf", n_ctx=512), extra=HTTP)
    try:
        client = ollama.Client(host=daemon.http_url)
        said = grpc_chat(daemon, MESSAGES, 10, model="thinker")
        assert "</think>" not in said  # random weights never close it: all of the reply is reasoning
        thought = client.chat(model="thinker", messages=MESSAGES, options=GREEDY, think=True)
        assert thought.message.thinking == said and thought.message.content == ""
        parts = list(client.chat(model="thinker", messages=MESSAGES, options=GREEDY, think=True, stream=True))
        assert "".join(p.message.thinking or "" for p in parts) == said
        assert "".join(p.message.content for p in parts) == ""
        generated = client.generate(model="thinker", prompt="Say hello", options=GREEDY, think=True)
        assert generated.thinking == said and generated.response == ""
        plain = client.chat(model="thinker", messages=MESSAGES, options=GREEDY)  # no think: as the model writes it
        assert plain.message.content == said and not plain.message.thinking
    finally:
        daemon.stop()


def test_generate_with_system_and_raw(client, daemon):
    with_system = client.generate(model="tiny", prompt="Say hello", system="Be brief.", options=GREEDY)
    assert with_system.response == grpc_chat(daemon, [{"role": "system", "content": "Be brief."}, *MESSAGES], 10)
    raw = client.generate(model="tiny", prompt="Once upon a time", raw=True, options=GREEDY)
    expected = "".join(c.text for c in daemon.stub.Generate(pb.GenerateRequest(
        model="tiny", prompt="Once upon a time", options=pb.SamplingOptions(max_tokens=10, temperature=0.0))))
    assert raw.response == expected


def test_sampling_options_apply_and_runner_options_never_reload(client, daemon):
    pid = daemon.worker("tiny").pid
    stopped = client.chat(model="tiny", messages=MESSAGES, options={**GREEDY, "num_ctx": 8192, "num_gpu": 99,
                                                                    "num_thread": 1, "num_predict": 3})
    assert stopped.eval_count == 3
    assert daemon.worker("tiny").pid == pid  # the same worker: nothing reloaded
    assert "ollama_options_ignored" in daemon.log() and "num_ctx" in daemon.log()


def test_format_json_gives_json(client):
    reply = client.chat(model="tiny", messages=MESSAGES, format="json", options={"temperature": 0.8, "seed": 1,
                                                                                 "num_predict": 300})
    assert reply.done_reason == "stop" and isinstance(json.loads(reply.message.content), dict)


def test_embed(client, daemon):
    reply = client.embed(model="emb", input=["hello world", "goodbye"])
    expected = daemon.stub.Embed(pb.EmbedRequest(model="emb", input=["hello world", "goodbye"]))
    assert len(reply.embeddings) == 2
    for ours, theirs in zip(reply.embeddings, expected.embeddings):
        assert ours == pytest.approx(list(theirs.values), abs=1e-6)
    assert reply.prompt_eval_count == expected.prompt_tokens


def test_unknown_model_is_a_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=MESSAGES)
    assert e.value.status_code == 404 and "unknown model 'nope'" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.generate(model="nope", prompt="hi", stream=True))
    assert e.value.status_code == 404


def test_pull_says_how_models_get_here(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3")
    assert e.value.status_code == 501 and "llmctl load" in e.value.error


def test_empty_prompt_loads_and_keep_alive_0_unloads(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512, keep_alive="5m"), extra=HTTP)
    try:
        client = ollama.Client(host=daemon.http_url)
        assert [m.model for m in client.ps().models] == ["tiny:latest"]
        unloaded = client.generate(model="tiny", prompt="", keep_alive=0)
        assert unloaded.done and unloaded.done_reason == "unload"
        wait_for(lambda: not client.ps().models, 30, what="the model to leave /api/ps")
        wait_for(lambda: daemon.worker("tiny").pid == 0, 30, what="its worker to exit")
        loaded = client.chat(model="tiny", messages=[], keep_alive="10m")
        assert loaded.done_reason == "load"
        assert daemon.worker("tiny").pid != 0  # loaded before the answer came
        (running,) = client.ps().models
        assert running.model == "tiny:latest" and running.size > 0 and running.size_vram == 0
        assert 500 < (running.expires_at.timestamp() - time.time()) <= 600  # keep_alive 10m
        # Preloading a model already loaded counts keep_alive from now, in Go's spelling too.
        client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 2}, keep_alive="1h0m0s")
        assert client.generate(model="tiny", prompt="", keep_alive="2h30m").done_reason == "load"
        assert 2.4 * 3600 < daemon.worker("tiny").unload_in_s <= 2.5 * 3600
        client.generate(model="tiny", prompt="", keep_alive="99999999h")  # past year 9999
        assert client.ps().models[0].expires_at.year == 9999
    finally:
        daemon.stop()


def test_delete_unloads_with_an_admin_token_only(model_dir, tmp_path):
    (tmp_path / "inference").write_text("inference-token-0123456789\n")
    (tmp_path / "admin").write_text("admin-token-0123456789abcdef\n")
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512),
                    extra=HTTP + f'[auth]\ninference_tokens_file = "{tmp_path / "inference"}"\n'
                                 f'admin_tokens_file = "{tmp_path / "admin"}"\n')
    try:
        inference = ollama.Client(host=daemon.http_url, headers={"Authorization": "Bearer inference-token-0123456789"})
        admin = ollama.Client(host=daemon.http_url, headers={"Authorization": "Bearer admin-token-0123456789abcdef"})
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=daemon.http_url).list()
        assert e.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as e:
            inference.delete("tiny")
        assert e.value.status_code == 403
        assert inference.chat(model="tiny", messages=MESSAGES, options={"num_predict": 2}).eval_count == 2
        admin.delete("tiny:latest")
        assert not admin.ps().models
        assert "tiny:latest" in [m.model for m in admin.list().models]  # the file stays, and may load again
    finally:
        daemon.stop()
