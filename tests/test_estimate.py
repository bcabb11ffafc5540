"""Memory estimates from the GGUF header, checked against what real workers use."""

from __future__ import annotations

import concurrent.futures

import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.config import Host, model_config
from supervisor.settings.demo_model import ModelShape, write_model
from supervisor.decide.estimate import KV_TYPE_BYTES, estimate, host_memory_note, mlock_refusal, unmapped_refusal
from supervisor.settings.gguf_file import read_gguf_info
from tests.conftest import launch
from tests.test_llmctl import llmctl

MiB = 1 << 20
HOST = Host(memory_bytes=64 << 30, is_root=False, env={})
WIDE = ModelShape(n_embd=256, n_layer=4, n_head=8, n_head_kv=8, n_ff=512)
GQA = ModelShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ff=1024)
# (file, shape, options): layer counts, widths, contexts, KV types, mmap on and off, flash attention.
CASES = {
    "tiny": ("tiny.gguf", ModelShape(), {"n_ctx": "512"}),
    "wide": ("wide.gguf", WIDE, {"n_ctx": "4096"}),
    "wide_nommap": ("wide.gguf", WIDE, {"n_ctx": "4096", "use_mmap": "false"}),
    "gqa_q8": ("gqa.gguf", GQA, {"n_ctx": "8192", "type_k": "q8_0"}),
    "gqa_q4_fa": ("gqa.gguf", GQA, {"n_ctx": "8192", "type_k": "q4_0", "type_v": "q4_0", "flash_attn": "true"}),
}


@pytest.fixture(scope="module")
def shapes_daemon():
    directory = Path(tempfile.mkdtemp(prefix="llms-shapes-"))
    for file, shape, _ in CASES.values():
        if not (directory / file).exists():
            write_model(directory / file, shape)
    daemon = launch(directory, "")
    yield daemon
    daemon.stop()
    shutil.rmtree(directory, ignore_errors=True)


def config(**options):
    return model_config("m", {"path": "m.gguf", **options}, {}, HOST)


@pytest.mark.parametrize("type_k, type_v", [("f16", "f16"), ("q8_0", "f16"), ("q4_0", "q4_0"), ("f32", "q8_0")])
def test_kv_cache_is_context_times_layers_times_kv_width_times_type_size(tmp_path, type_k, type_v):
    shape = read_gguf_info(write_model(tmp_path / "gqa.gguf", GQA)).shape
    e = estimate(shape, config(n_ctx=1000, type_k=type_k, type_v=type_v))
    assert e.n_ctx == 1024  # llama.cpp's padding to 256
    per_token = GQA.n_head_kv * GQA.head_dim * (KV_TYPE_BYTES[type_k] + KV_TYPE_BYTES[type_v])
    assert e.kv_cpu == GQA.n_layer * int(1024 * per_token) and e.kv_gpu == 0


def test_gpu_layers_split_weights_and_kv_and_mmap_decides_what_is_private(tmp_path):
    shape = read_gguf_info(write_model(tmp_path / "gqa.gguf", GQA)).shape
    layer = shape.layer_bytes[0]
    half = estimate(shape, config(n_gpu_layers=4))
    assert half.weights_gpu == 4 * layer and half.kv_gpu == half.kv_cpu > 0
    assert half.weights_mapped == shape.input_bytes + 4 * layer + shape.output_bytes and half.weights_private == 0
    every = estimate(shape, config(n_gpu_layers=-1))
    assert every.weights_gpu == 8 * layer + shape.output_bytes and every.kv_cpu == 0 and every.gpu > every.weights_gpu
    cpu = estimate(shape, config(use_mmap=False))
    assert cpu.gpu == 0 and cpu.weights_private == shape.input_bytes + 8 * layer + shape.output_bytes
    assert cpu.private_peak - estimate(shape, config()).private_peak == cpu.weights_private


@pytest.mark.parametrize("case", CASES)
def test_estimate_at_load_is_within_25_percent_of_the_workers_private_memory(shapes_daemon, case):
    file, _, options = CASES[case]
    figures = shapes_daemon.stub.EstimateModel(pb.EstimateModelRequest(path=file, options=options)).estimate
    shapes_daemon.stub.LoadModel(pb.LoadModelRequest(name=case, path=file, options=options))
    try:
        measured = shapes_daemon.worker(case).private_memory_bytes
        assert 0.75 < figures.private_at_load_bytes / measured < 1.25, (figures, measured / MiB)
        listed = {m.name: m for m in shapes_daemon.stub.ListModels(pb.ListModelsRequest()).models}[case]
        assert listed.estimate == figures  # what it was loaded with
    finally:
        shapes_daemon.stub.UnloadModel(pb.UnloadModelRequest(name=case))


def test_estimate_at_full_context_is_within_25_percent_once_the_context_is_full(shapes_daemon):
    file, _, options = CASES["wide"]
    figures = shapes_daemon.stub.EstimateModel(pb.EstimateModelRequest(path=file, options=options)).estimate
    shapes_daemon.stub.LoadModel(pb.LoadModelRequest(name="full", path=file, options=options))
    try:
        one = shapes_daemon.stub.Tokenize(pb.TokenizeRequest(model="full", text="the model " * 100)).count
        prompt = "the model " * int(100 * (4096 - 64) / one)
        chunks = list(shapes_daemon.stub.Generate(pb.GenerateRequest(
            model="full", prompt=prompt, options=pb.SamplingOptions(max_tokens=8))))
        assert chunks[-1].usage.prompt_tokens > 3900
        measured = shapes_daemon.worker("full").private_memory_bytes
        assert 0.75 < figures.private_peak_bytes / measured < 1.25, (figures, measured / MiB)
        assert figures.private_peak_bytes > 2 * figures.private_at_load_bytes  # why both are shown
    finally:
        shapes_daemon.stub.UnloadModel(pb.UnloadModelRequest(name="full"))


def test_eight_sequences_filling_the_pool_cost_what_one_full_context_costs(shapes_daemon):
    file, _, options = CASES["wide"]
    one = shapes_daemon.stub.EstimateModel(pb.EstimateModelRequest(path=file, options={**options, "parallel": "1"})).estimate
    options = {**options, "parallel": "8"}
    eight = shapes_daemon.stub.EstimateModel(pb.EstimateModelRequest(path=file, options=options)).estimate
    # One KV pool whatever the parallel: only the logits of the sequences sampling together differ.
    assert eight.kv_cache_cpu_bytes == one.kv_cache_cpu_bytes
    assert eight.private_peak_bytes - one.private_peak_bytes == eight.outputs_bytes - one.outputs_bytes < MiB
    shapes_daemon.stub.LoadModel(pb.LoadModelRequest(name="eight", path=file, options=options))
    try:
        one_piece = shapes_daemon.stub.Tokenize(pb.TokenizeRequest(model="eight", text="the model " * 100)).count
        prompt = "the model " * int(100 * (4096 // 8 - 40) / one_piece)

        def stream(i: int):
            return list(shapes_daemon.stub.Generate(pb.GenerateRequest(
                model="eight", prompt=f"{i} {prompt}", options=pb.SamplingOptions(max_tokens=16))))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(stream, range(8)))
        used = sum(r[-1].usage.prompt_tokens + r[-1].usage.completion_tokens for r in results)
        assert used > 3800  # the eight filled the pool between them
        measured = shapes_daemon.worker("eight").private_memory_bytes
        assert 0.75 < eight.private_peak_bytes / measured < 1.25, (eight, measured / MiB)
    finally:
        shapes_daemon.stub.UnloadModel(pb.UnloadModelRequest(name="eight"))


def test_llmctl_estimate_prints_the_parts(shapes_daemon):
    table = llmctl(shapes_daemon, "estimate", "gqa.gguf", "--option", "n_ctx=8192", "--option", "type_k=q8_0")
    assert table.returncode == 0, table.stderr
    assert "n_ctx 8192" in table.stdout.splitlines()[0]
    rows = {line.split("  ")[0]: line for line in table.stdout.splitlines()[2:]}
    assert "24.5 MiB" in rows["KV cache"] and "mapped from the file" in rows["weights"]
    as_json = json.loads(llmctl(shapes_daemon, "--json", "estimate", "gqa.gguf", "--option", "n_gpu_layers=-1").stdout)
    assert int(as_json["estimate"]["weights_gpu_bytes"]) > 0 and int(as_json["estimate"]["gpu_runtime_bytes"]) > 0
    bad = llmctl(shapes_daemon, "estimate", "gqa.gguf", "--option", "type_k=q3")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "type_k must be one of" in bad.stderr


def test_mlock_mmap_and_free_ram_checks(tmp_path):
    shape = read_gguf_info(write_model(tmp_path / "gqa.gguf", GQA)).shape
    mapped, unmapped = estimate(shape, config(use_mlock=True)), estimate(shape, config(use_mmap=False))
    weights = mapped.weights_mapped
    assert mlock_refusal(mapped, -1, False) == "" and mlock_refusal(mapped, weights, False) == ""
    assert mlock_refusal(mapped, 0, True) == ""  # CAP_IPC_LOCK may lock anything
    assert "RLIMIT_MEMLOCK allows 8.0 MiB" in mlock_refusal(mapped, 8 * MiB, False)
    assert host_memory_note(mapped, weights - 1).startswith("weights (") and host_memory_note(mapped, weights) == ""
    assert "leave use_mmap on" in unmapped_refusal(unmapped, weights - 1)
    assert unmapped_refusal(unmapped, weights) == "" and unmapped_refusal(mapped, 0) == ""


def test_use_mlock_past_rlimit_memlock_is_refused_with_what_to_do(model_dir):
    # No CAP_IPC_LOCK (root has it: drop it from the bounding set) and 64 KiB of RLIMIT_MEMLOCK.
    prefix = (("setpriv", "--bounding-set", "-ipc_lock") if os.geteuid() == 0 else ()) + ("prlimit", "--memlock=65536:65536")
    daemon = launch(model_dir, "", prefix=prefix)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            daemon.stub.LoadModel(pb.LoadModelRequest(name="locked", path="tiny.gguf", options={"use_mlock": "true"}))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "RLIMIT_MEMLOCK allows 0.1 MiB" in refused.value.details()
        assert "LimitMEMLOCK=infinity" in refused.value.details()
        daemon.stub.LoadModel(pb.LoadModelRequest(name="unlocked", path="tiny.gguf"))
    finally:
        daemon.stop()


# Quantized as real GGUFs are: Q8_0 is used as mapped; Q4_0 and Q4_K matrices are repacked by the CPU
# backend into private buffers. Wide enough that the repacked bytes are a real share of the worker.
QUANT_SHAPE = ModelShape(n_embd=1024, n_layer=4, n_head=16, n_head_kv=16, n_ff=2816)
QUANT_CASES = {
    "q8_0": ("Q8_0.gguf", {"n_ctx": "2048"}),
    "q4_0": ("Q4_0.gguf", {"n_ctx": "2048"}),
    "q4_k_m": ("Q4_K_M.gguf", {"n_ctx": "2048"}),
    "q4_0_batch_2048": ("Q4_0.gguf", {"n_ctx": "4096", "n_batch": "2048"}),
}


@pytest.fixture(scope="module")
def quantized_daemon():
    from tests.conftest import quantize_beside

    directory = Path(tempfile.mkdtemp(prefix="llms-quant-"))
    quantize_beside(write_model(directory / "F32.gguf", QUANT_SHAPE), ("Q8_0", "Q4_0", "Q4_K_M"))
    daemon = launch(directory, "")
    yield daemon
    daemon.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("case", QUANT_CASES)
def test_estimate_of_quantized_models_is_within_15_percent_repacked_weights_included(quantized_daemon, case):
    file, options = QUANT_CASES[case]
    figures = quantized_daemon.stub.EstimateModel(pb.EstimateModelRequest(path=file, options=options)).estimate
    assert (figures.weights_repacked_bytes > 10 * MiB) == case.startswith("q4")  # Q8_0 stays mapped
    quantized_daemon.stub.LoadModel(pb.LoadModelRequest(name=case, path=file, options=options))
    try:
        measured = quantized_daemon.worker(case).private_memory_bytes
        assert 0.85 < figures.private_at_load_bytes / measured < 1.15, (case, figures.private_at_load_bytes / MiB,
                                                                         measured / MiB)
    finally:
        quantized_daemon.stub.UnloadModel(pb.UnloadModelRequest(name=case))
