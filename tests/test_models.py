"""Loading and unloading models at run time, and every way a model file can be wrong."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.config import Host, load_config
from supervisor.server.daemon import ensure_demo_model
from tests.conftest import loaded_models, pid_alive


def load(daemon, name, path, **options):
    return daemon.stub.LoadModel(pb.LoadModelRequest(name=name, path=path, options={k: str(v) for k, v in options.items()}))


def refused(daemon, name, path, **options) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        load(daemon, name, path, **options)
    return caught.value


def test_load_generate_unload(start_daemon):
    daemon = start_daemon()
    reply = load(daemon, "mine", "tiny.gguf", n_ctx=256, n_threads=1)
    assert reply.model.state == "READY" and reply.model.source == "api" and reply.model.n_ctx == 256
    chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="mine", prompt="hi", options=pb.SamplingOptions(max_tokens=4))))
    assert chunks[-1].usage.completion_tokens == 4
    pid = daemon.worker("mine").pid
    daemon.stub.UnloadModel(pb.UnloadModelRequest(name="mine"))
    assert not pid_alive(pid)
    assert not loaded_models(daemon)
    with pytest.raises(grpc.RpcError) as caught:
        daemon.stub.UnloadModel(pb.UnloadModelRequest(name="mine"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_bad_load_is_refused_before_a_worker_starts(start_daemon, model_dir, tmp_path):
    daemon = start_daemon()
    (model_dir / "garbage.gguf").write_bytes(b"not a model at all")
    data = (model_dir / "tiny.gguf").read_bytes()
    (model_dir / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (model_dir / "header-only.gguf").write_bytes(data[:8])
    outside = tmp_path / "outside.gguf"
    shutil.copy(model_dir / "tiny.gguf", outside)
    link = model_dir / "escape.gguf"
    link.unlink(missing_ok=True)
    os.symlink(outside, link)

    cases = [
        (("x", "missing.gguf"), {}, grpc.StatusCode.NOT_FOUND, "no model file 'missing.gguf'"),
        (("x", "garbage.gguf"), {}, grpc.StatusCode.FAILED_PRECONDITION, "not a GGUF file"),
        (("x", "truncated.gguf"), {}, grpc.StatusCode.FAILED_PRECONDITION, "not a valid GGUF file"),
        (("x", "header-only.gguf"), {}, grpc.StatusCode.FAILED_PRECONDITION, "not a valid GGUF file"),
        (("x", "../outside.gguf"), {}, grpc.StatusCode.FAILED_PRECONDITION, "contains '..'"),
        (("x", "escape.gguf"), {}, grpc.StatusCode.FAILED_PRECONDITION, "outside the allowed model directories"),
        (("x", str(outside)), {}, grpc.StatusCode.FAILED_PRECONDITION, "outside the allowed model directories"),
        (("x", ""), {}, grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
        (("bad name!", "tiny.gguf"), {}, grpc.StatusCode.INVALID_ARGUMENT, "model name 'bad name!'"),
        (("x", "tiny.gguf"), {"n_ctx": "lots"}, grpc.StatusCode.INVALID_ARGUMENT, "n_ctx: expected a whole number"),
        (("x", "tiny.gguf"), {"colour": "red"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown option 'colour'"),
        (("x", "tiny.gguf"), {"type_k": "q3"}, grpc.StatusCode.INVALID_ARGUMENT, "type_k must be one of"),
        (("x", "tiny.gguf"), {"use_mmap": "maybe"}, grpc.StatusCode.INVALID_ARGUMENT, "expected true or false"),
    ]
    for (name, path), options, code, words in cases:
        error = refused(daemon, name, path, **options)
        assert (error.code(), words in error.details()) == (code, True), (path, options, error.details())
    assert not daemon.stub.Status(pb.StatusRequest()).workers  # no worker was ever started
    assert '"worker_spawned"' not in daemon.log()


def test_loading_a_name_twice_is_refused(start_daemon):
    daemon = start_daemon()
    load(daemon, "once", "tiny.gguf")
    error = refused(daemon, "once", "tiny.gguf")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "already loaded" in error.details()


def test_embedded_default_generates_and_serves_the_demo_model(start_daemon):
    daemon = start_daemon(config=False)
    demo = daemon.state_dir / "models" / "demo.gguf"
    assert demo.is_file()
    chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="demo", prompt="hello", options=pb.SamplingOptions(max_tokens=5))))
    assert chunks[-1].usage.completion_tokens == 5
    # Generated once: a restart serves the same file rather than writing a new one.
    modified = demo.stat().st_mtime_ns
    ensure_demo_model(load_config(None, Host(1 << 30, True, {"STATE_DIRECTORY": str(daemon.state_dir),
                                                             "RUNTIME_DIRECTORY": str(daemon.run_dir)})))
    assert demo.stat().st_mtime_ns == modified


def test_a_models_max_tokens_caps_requests_without_truncating_them(start_daemon):
    daemon = start_daemon()
    load(daemon, "capped", "tiny.gguf", max_tokens=8)

    def ask(n):
        return list(daemon.stub.Generate(pb.GenerateRequest(model="capped", prompt="hi", options=pb.SamplingOptions(max_tokens=n))))

    assert ask(0)[-1].usage.completion_tokens == 8  # no max_tokens: the cap applies
    assert ask(5)[-1].usage.completion_tokens == 5
    with pytest.raises(grpc.RpcError) as caught:
        ask(9)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cap of 8" in caught.value.details()


def test_address_flag_overrides_the_config(start_daemon):
    daemon = start_daemon(address_flag=True)
    assert daemon.address.endswith("/flag.sock")
    assert daemon.stub.Status(pb.StatusRequest()).version
    assert not (daemon.run_dir / "supervisor.sock").exists()
