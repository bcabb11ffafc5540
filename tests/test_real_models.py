"""Models as users have them, not only as tests make them: quantized (Q4_0, Q8_0, Q4_K_M), carrying chat
templates of hundreds of KB; and workers that die the deterministic deaths of a bad build or file."""

from __future__ import annotations


import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.demo_model import CHAT_TEMPLATE, QUANTIZABLE, write_model
from tests.conftest import HTTP, launch, model_table, quantize_beside, wait_for

KINDS = ("Q4_0", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("real-models")
    quantize_beside(write_model(directory / "f32.gguf", QUANTIZABLE, name="quantizable"), KINDS)
    # A jinja comment makes the template 200 KB without changing what it renders.
    write_model(directory / "long-template.gguf", name="long-template",
                chat_template=CHAT_TEMPLATE + "{# " + "padding " * 25_000 + "#}")
    return directory


def generate(daemon, model: str, max_tokens: int = 8) -> tuple[str, pb.Usage]:
    chunks = list(daemon.stub.Generate(pb.GenerateRequest(model=model, prompt="the model memory " * 20,
                                                          options=pb.SamplingOptions(max_tokens=max_tokens)),
                                       timeout=60))
    return "".join(c.text for c in chunks), chunks[-1].usage


def test_quantized_models_load_and_generate_on_defaults(real_models):
    daemon = launch(real_models, "\n".join(model_table(kind.lower(), f"{kind}.gguf") for kind in KINDS))
    try:
        for kind in KINDS:
            text, usage = generate(daemon, kind.lower(), max_tokens=16)
            assert usage.completion_tokens == 16 and text, kind
        states = {w.model: w.state for w in daemon.stub.Status(pb.StatusRequest()).workers}
        assert states == {kind.lower(): "READY" for kind in KINDS}, daemon.log()
    finally:
        daemon.stop()


def test_a_chat_template_of_200_kb_loads(real_models):
    daemon = launch(real_models, model_table("long", "long-template.gguf", load_timeout="30s"))
    try:
        assert daemon.worker("long").state == "READY", daemon.log()
        chunks = list(daemon.stub.Chat(pb.ChatRequest(model="long", messages=[pb.ChatMessage(role="user", content="hi")],
                                                      options=pb.SamplingOptions(max_tokens=4)), timeout=60))
        assert chunks[-1].usage.completion_tokens == 4
        # llama.cpp's metadata line is in the log, cut to a readable length and saying what was cut.
        tail = [line.line for line in daemon.stub.TailModel(pb.TailModelRequest(name="long"))]
        assert any("bytes more]" in line and len(line) < 20_000 for line in tail)
    finally:
        daemon.stop()


def test_real_clients_on_a_quantized_model_with_a_200_kb_template_on_defaults(real_models):
    import ollama
    import openai

    daemon = launch(real_models, model_table("q4", "Q4_K_M.gguf") + "\n" + model_table("long", "long-template.gguf"),
                    extra=HTTP)
    try:
        client = openai.OpenAI(base_url=f"{daemon.http_url}/v1", api_key="unused", max_retries=0)
        for model in ("q4", "long"):
            chunks = list(client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True,
                stream_options={"include_usage": True}))
            assert chunks[-1].usage.completion_tokens == 8
            reply = ollama.Client(host=daemon.http_url).chat(model=f"{model}:latest",
                                                             messages=[{"role": "user", "content": "hello"}],
                                                             options={"num_predict": 8})
            assert reply.eval_count == 8 and reply.done_reason == "length"
        shown = ollama.Client(host=daemon.http_url).show("q4")
        assert shown.details.quantization_level == "Q4_K_M" and len(shown.template) < 1000
        assert len(ollama.Client(host=daemon.http_url).show("long").template) > 200_000
    finally:
        daemon.stop()


@pytest.mark.parametrize("signal_name, advice", [("SIGILL", "--check-build"), ("SIGBUS", "truncated")])
def test_a_death_that_would_repeat_is_fatal_at_once_with_what_to_do(model_dir, start_daemon, signal_name, advice):
    daemon = start_daemon(model_table("doomed", "tiny.gguf", n_ctx=256, engine="tests.crash_engines:SignalEngine"),
                          env={"TEST_DIE_OF": signal_name})
    first_pid = daemon.worker("doomed").pid
    with pytest.raises(grpc.RpcError) as failed:
        list(daemon.stub.Generate(pb.GenerateRequest(model="doomed", prompt="hi",
                                                     options=pb.SamplingOptions(max_tokens=4)), timeout=60))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert signal_name in failed.value.details() and advice in failed.value.details()
    wait_for(lambda: daemon.worker("doomed").state == "FATAL", what="the model to be FATAL")
    # The next request is told why, and what to do, at once: no blind restarts were tried.
    with pytest.raises(grpc.RpcError) as refused:
        list(daemon.stub.Generate(pb.GenerateRequest(model="doomed", prompt="hi"), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "FATAL" in refused.value.details() and advice in refused.value.details()
    spawned = [line for line in daemon.log().splitlines() if "worker_spawned" in line and first_pid and "doomed" in line]
    assert len(spawned) == 1, spawned
