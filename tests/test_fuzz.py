"""Fuzzing with hypothesis: requests, config files and GGUF files. Each gets an answer or a clear error,
never a crash, and the daemon keeps serving."""

from __future__ import annotations

import math
import struct
import tempfile
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.config import ConfigError, Host, parse_config
from supervisor.errors import ApiError
from supervisor.settings.gguf_file import read_gguf_info
from tests.conftest import model_table

HOST = Host(memory_bytes=64 << 30, is_root=False, env={})
# What a request may fairly be told; anything else (UNKNOWN, INTERNAL) is a crash in disguise.
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}
LIVE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([math.nan, -1.0, 0.0, 1e30]))
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
texts = st.one_of(st.text(max_size=200), st.text(alphabet="the model ", max_size=2000), st.just(""))


@st.composite
def sampling(draw) -> pb.SamplingOptions:
    options = pb.SamplingOptions(max_tokens=draw(st.one_of(st.integers(0, 64), uint32)),
                                 stop=draw(st.lists(st.text(max_size=50), max_size=draw(st.sampled_from([3, 40])))))
    for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
        if draw(st.booleans()):
            setattr(options, name, draw(floats))
    for name in ("top_k", "seed"):
        if draw(st.booleans()):
            setattr(options, name, draw(uint32))
    return options


def answer(call) -> grpc.StatusCode:
    try:
        chunks = list(call)
    except grpc.RpcError as e:
        assert e.code() in CLEAR, (e.code(), e.details())
        assert e.details(), "an error without a message"
        return e.code()
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return grpc.StatusCode.OK


def still_serves(daemon) -> None:
    final = list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi",
                                                         options=pb.SamplingOptions(max_tokens=2))))[-1]
    assert final.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def fuzz_daemon(model_dir):
    from tests.conftest import launch

    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256))
    yield daemon
    daemon.stop()


@LIVE
@given(prompt=texts, options=sampling(), model=st.sampled_from(["tiny", "", "nope", "../tiny", "x" * 300]),
       keep_alive=st.sampled_from(["", "5m", "-1", "0", "banana", "-5s", "9" * 40]))
def test_generate_requests(fuzz_daemon, prompt, options, model, keep_alive):
    answer(fuzz_daemon.stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, options=options,
                                                        keep_alive=keep_alive), timeout=60))
    still_serves(fuzz_daemon)


@LIVE
@given(messages=st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]),
                                                                  st.text(max_size=10)),
                                   content=texts), max_size=12),
       options=sampling())
def test_chat_requests(fuzz_daemon, messages, options):
    answer(fuzz_daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages, options=options), timeout=60))
    still_serves(fuzz_daemon)


@LIVE
@given(name=st.text(max_size=80), path=st.one_of(st.just("tiny.gguf"), st.text(max_size=80)),
       options=st.dictionaries(st.one_of(st.sampled_from(["n_ctx", "n_batch", "type_k", "use_mmap", "replicas",
                                                          "keep_alive", "max_private_memory", "n_gpu_layers"]),
                                         st.text(max_size=20)),
                               st.one_of(st.text(max_size=20), st.integers().map(str)), max_size=4))
def test_load_requests(fuzz_daemon, name, path, options):
    try:
        fuzz_daemon.stub.LoadModel(pb.LoadModelRequest(name=name, path=path, options=options), timeout=60)
    except grpc.RpcError as e:
        assert e.code() in CLEAR | {grpc.StatusCode.UNAVAILABLE}, (e.code(), e.details())
        assert e.details()
    else:
        fuzz_daemon.stub.UnloadModel(pb.UnloadModelRequest(name=name))
    still_serves(fuzz_daemon)


toml_values = st.one_of(st.integers(-2**63, 2**63 - 1).map(str), st.floats(allow_nan=False).map(repr),
                        st.booleans().map(lambda b: str(b).lower()), st.text(max_size=30).map(lambda t: '"' + t.encode(
                            "unicode_escape").decode().replace('"', '\\\\"') + '"'),
                        st.just('["a", 1]'), st.just("{}"), st.just("inf"), st.just("nan"))
keys = st.one_of(st.sampled_from(["address", "poll_interval", "memory_budget", "gpu_memory_budget", "standby_workers",
                                  "max_loaded_models", "n_ctx", "path", "type_k", "keep_alive", "replicas", "level",
                                  "journald", "cert", "insecure", "max_message_size"]),
                 st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
sections = st.sampled_from(["supervisor", "logging", "metrics", "tls", "auth", "defaults", "models.m", "models.x y",
                            "nonsense"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(sections, st.lists(st.tuples(keys, toml_values), max_size=5)), max_size=5))
def test_config_files(tables):
    text = "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {v}" for k, v in entries) for section, entries in tables)
    try:
        parse_config(text, HOST)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_config_text_that_is_not_even_toml(text):
    try:
        parse_config(text, HOST)
    except ConfigError as e:
        assert str(e)


@pytest.fixture(scope="module")
def gguf_bytes(model_dir) -> bytes:
    return (model_dir / "tiny.gguf").read_bytes()


# What a refusal must name: the file, and which of these is wrong with it.
WHAT_IS_WRONG = ("is not a GGUF file", "is GGUF version", "ends inside its header", "declares", "is truncated",
                 "metadata is damaged or cut short", "holds no tensors", "general.architecture is missing")


def check_gguf(data: bytes, complete: bool = True) -> None:
    """Either it reads as a GGUF or the refusal says what is wrong; a file cut short is never taken whole."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "m.gguf"
        path.write_bytes(data)
        try:
            read_gguf_info(path)
        except ApiError as e:
            assert e.code == grpc.StatusCode.FAILED_PRECONDITION and str(path) in e.message
            assert any(words in e.message for words in WHAT_IS_WRONG), e.message
        else:
            assert complete, "a truncated GGUF was read as if whole"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 1 << 20))
def test_truncated_gguf(gguf_bytes, cut):
    check_gguf(gguf_bytes[:cut % len(gguf_bytes)], complete=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=512), keep=st.integers(4, 64))
def test_garbage_after_a_gguf_magic(gguf_bytes, garbage, keep):
    check_gguf(gguf_bytes[:keep] + garbage)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.integers(0, 2**64 - 1), keys=st.integers(0, 2**64 - 1))
def test_huge_declared_counts(gguf_bytes, tensors, keys):
    check_gguf(gguf_bytes[:8] + struct.pack("<QQ", tensors, keys) + gguf_bytes[24:])


def test_a_hostile_gguf_through_the_api_is_refused_and_the_daemon_serves_on(fuzz_daemon, model_dir):
    hostile = model_dir / "hostile.gguf"
    hostile.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + b"\0" * 64)
    with pytest.raises(grpc.RpcError) as refused:
        fuzz_daemon.stub.LoadModel(pb.LoadModelRequest(name="hostile", path="hostile.gguf"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "declares 4611686018427387904 tensors" in refused.value.details()
    still_serves(fuzz_daemon)
