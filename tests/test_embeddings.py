"""Embedding mode (`embedding = true`): a real daemon and real workers on generated models, and the
worker's embedding service on its own with a scripted embedder."""

from __future__ import annotations

import json
import math
import os
import signal
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc_testing
import numpy as np
import pytest
from gguf import GGUFReader

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2
from supervisor.decide.estimate import estimate
from supervisor.settings.config import ModelConfig
from supervisor.settings.demo_model import QUANTIZABLE, write_model
from supervisor.settings.gguf_file import read_gguf_info
from tests.conftest import launch, model_table, quantize_beside, wait_for
from tests.test_llmctl import llmctl
from worker.embedding import POOLING_CLS, POOLING_LAST, POOLING_MEAN, pooling_of, unit
from worker.embedding_service import EmbeddingService
from worker.engine import EngineError, EngineInfo

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
EMBED_DELAY_S = 0.3  # per input, on the `slow` model
LONG = "hello " * 700  # more tokens than a context of 512


def n_embd(path: Path) -> int:
    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])


def write_bert(path: Path, n_embd: int = 64, n_ff: int = 128, n_layer: int = 2, n_ctx: int = 512) -> Path:
    """A tiny BERT (non-causal, CLS pooling stated in its header, a WordPiece vocabulary) with random
    weights: the kind most embedding models are, whose pass llama.cpp runs through its encoder."""
    from gguf import GGUFWriter, PoolingType, TokenType

    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # llama.cpp's WordPiece marks a word's start with ▁ (the converter's rewrite of BERT's ##-continuations).
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *("▁" + c for c in letters), *letters,
              *("▁" + w for w in ("hello", "world", "the", "cache"))]
    writer = GGUFWriter(str(path), "bert")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(PoolingType.CLS)
    writer.add_file_type(0)
    writer.add_token_type_count(2)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types([int(TokenType.CONTROL)] * 5 + [int(TokenType.NORMAL)] * (len(tokens) - 5))
    for add, token in ((writer.add_pad_token_id, 0), (writer.add_unk_token_id, 1), (writer.add_bos_token_id, 2),
                       (writer.add_sep_token_id, 3), (writer.add_mask_token_id, 4)):
        add(token)

    def tensor(name: str, *dims: int, value: float | None = None) -> None:
        data = np.full(dims, value, np.float32) if value is not None else rng.standard_normal(dims, np.float32) * 0.02
        writer.add_tensor(name, data.astype(np.float32))

    tensor("token_embd.weight", len(tokens), n_embd)
    tensor("token_types.weight", 2, n_embd)
    tensor("position_embd.weight", n_ctx, n_embd)
    norms = ["token_embd_norm"]
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{name}.weight", n_embd, n_embd)
            tensor(f"blk.{i}.{name}.bias", n_embd, value=0.0)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.bias", n_ff, value=0.0)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        tensor(f"blk.{i}.ffn_down.bias", n_embd, value=0.0)
        norms += [f"blk.{i}.attn_output_norm", f"blk.{i}.layer_output_norm"]
    for name in norms:
        tensor(f"{name}.weight", n_embd, value=1.0)
        tensor(f"{name}.bias", n_embd, value=0.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def daemon():
    """emb: the tiny model embedding; tiny: the same file generating; q8: a quantized one embedding; bert: a
    non-causal one; slow:
    embedding EMBED_DELAY_S per input, one request waiting at most, and a heartbeat_timeout shorter than a
    request of several inputs."""
    directory = Path(tempfile.mkdtemp(prefix="llms-emb-"))
    write_model(directory / "tiny.gguf")
    quantize_beside(write_model(directory / "F32.gguf", QUANTIZABLE), ("Q8_0",))
    write_bert(directory / "bert.gguf")
    models = "\n".join([
        model_table("emb", "tiny.gguf", n_ctx=512, embedding=True),
        model_table("tiny", "tiny.gguf", n_ctx=512),
        model_table("q8", "Q8_0.gguf", n_ctx=256, embedding=True),
        model_table("bert", "bert.gguf", n_ctx=512, embedding=True),
        model_table("slow", "tiny.gguf", n_ctx=256, embedding=True, engine="tests.engines:SlowEmbedder", max_queue=1,
                    heartbeat_timeout="1s", parallel=4),
    ])
    running = launch(directory, models, extra='poll_interval = "100ms"', env={"TEST_EMBED_DELAY": str(EMBED_DELAY_S)})
    running.model_dir = directory
    yield running
    running.stop()
    shutil.rmtree(directory, ignore_errors=True)


def embed(daemon, model: str, *texts: str, truncate: bool = False, timeout: float = 30) -> pb.EmbedResponse:
    return daemon.stub.Embed(pb.EmbedRequest(model=model, input=list(texts), truncate=truncate), timeout=timeout)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def norm(values) -> float:
    return math.sqrt(sum(x * x for x in values))


# -- through the daemon ------------------------------------------------------------------------------------
def test_a_unit_vector_per_input_as_wide_as_the_model_the_same_for_the_same_text(daemon):
    reply = embed(daemon, "emb", "hello world", "the cache", "hello world")
    width = n_embd(daemon.model_dir / "tiny.gguf")
    assert reply.model == "emb" and len(reply.embeddings) == 3
    first, other, again = (list(e.values) for e in reply.embeddings)
    assert all(len(v) == width for v in (first, other, again))
    assert all(abs(norm(v) - 1) < 1e-4 for v in (first, other, again))
    assert first == again and first != other
    assert first == list(embed(daemon, "emb", "hello world").embeddings[0].values)  # across requests too
    counts = [daemon.stub.Tokenize(pb.TokenizeRequest(model="emb", text=t, add_special=True)).count
              for t in ("hello world", "the cache", "hello world")]
    assert reply.prompt_tokens == sum(counts)
    assert reply.worker_pid == daemon.worker("emb").pid and reply.total_s > 0


def test_a_quantized_model_embeds(daemon):
    reply = embed(daemon, "q8", "hello world", "the cache")
    width = n_embd(daemon.model_dir / "Q8_0.gguf")
    assert [len(e.values) for e in reply.embeddings] == [width, width]
    assert width != n_embd(daemon.model_dir / "tiny.gguf")  # its own width, not the other model's
    assert all(abs(norm(e.values) - 1) < 1e-4 for e in reply.embeddings)
    assert reply.embeddings[0].values != reply.embeddings[1].values


def test_a_bert_model_embeds_through_its_encoder_pooled_as_its_header_says(daemon):
    reply = embed(daemon, "bert", "hello world", "the cache", "hello world")
    first, other, again = (list(e.values) for e in reply.embeddings)
    assert len(first) == n_embd(daemon.model_dir / "bert.gguf")
    assert all(abs(norm(v) - 1) < 1e-4 for v in (first, other, again))
    assert first == again and first != other
    assert reply.prompt_tokens == 3 * 4  # [CLS] word word [SEP]
    lines = [line.line for line in daemon.stub.TailModel(pb.TailModelRequest(name="bert", lines=0))]
    assert any("embedding: pooling cls" in line for line in lines)
    cut = embed(daemon, "bert", LONG, truncate=True)  # not past its 512 trained positions
    assert cut.prompt_tokens == 512 and abs(norm(cut.embeddings[0].values) - 1) < 1e-4


def test_generation_and_embedding_each_refuse_the_other_naming_what_to_do(daemon):
    generate = refusal(lambda: list(daemon.stub.Generate(pb.GenerateRequest(model="emb", prompt="hi"), timeout=10)))
    chat = refusal(lambda: list(daemon.stub.Chat(pb.ChatRequest(
        model="emb", messages=[pb.ChatMessage(role="user", content="hi")]), timeout=10)))
    for error in (generate, chat):
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'emb' is an embedding model: use Embed (/v1/embeddings, /api/embed)" in error.details()
    error = refusal(lambda: embed(daemon, "tiny", "hi"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "set `embedding = true` in [models.tiny]" in error.details()
    models = {m.name: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
    assert models["emb"].embedding and models["bert"].embedding and not models["tiny"].embedding


def test_bad_inputs_are_invalid_argument_and_name_the_input(daemon):
    for texts, expected in [((), "input is empty"), (("fine", ""), "input[1] is empty")]:
        error = refusal(lambda: embed(daemon, "emb", *texts))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details()
    tokens = daemon.stub.Tokenize(pb.TokenizeRequest(model="emb", text=LONG, add_special=True)).count
    error = refusal(lambda: embed(daemon, "emb", "short", LONG))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"input[1] is {tokens} tokens but model 'emb' has a context of 512 tokens (n_ctx)" in error.details()
    cut = embed(daemon, "emb", LONG, truncate=True)
    assert len(cut.embeddings) == 1 and abs(norm(cut.embeddings[0].values) - 1) < 1e-4
    assert cut.prompt_tokens == 512


def test_an_embedding_worker_is_in_status_like_any_other(daemon):
    before = daemon.worker("emb")
    embed(daemon, "emb", "status")
    worker = daemon.worker("emb")
    assert worker.pid > 0 and worker.state == "READY" and worker.private_memory_bytes > 0
    assert worker.requests_served == before.requests_served + 1
    assert worker.pool.parallel == 1 and worker.pool.n_ctx == 512 and worker.pool.sequences_active == 0
    # Its estimate counts a whole input in one batch, and agrees with what the worker holds after its warm-up.
    model = next(m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models if m.name == "emb")
    assert 0.75 < model.estimate.private_at_load_bytes / worker.private_memory_bytes < 1.25


def test_a_request_of_several_inputs_outlasts_heartbeat_timeout_because_each_input_beats(daemon):
    pid = daemon.worker("slow").pid
    reply = embed(daemon, "slow", *(f"input {i}" for i in range(6)))  # 6 × 0.3 s, heartbeat_timeout 1 s
    assert len(reply.embeddings) == 6 and reply.total_s > 1.5
    assert daemon.worker("slow").pid == pid and daemon.worker("slow").recycles == 0


def test_one_request_runs_at_a_time_and_max_queue_bounds_those_waiting(daemon):
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(embed, daemon, "slow", *"abcdef")
        wait_for(lambda: daemon.worker("slow").pool.sequences_active == 1, what="the first request to run")
        waiting = pool.submit(embed, daemon, "slow", "d")  # parallel = 4, but an embedding worker takes one
        wait_for(lambda: daemon.worker("slow").queue_depth == 1, what="the second request to wait")
        error = refusal(lambda: embed(daemon, "slow", "e"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue = 1" in error.details()
        assert len(running.result().embeddings) == 6 and len(waiting.result().embeddings) == 1


def test_a_request_whose_worker_dies_mid_call_is_retried_once_on_a_fresh_worker(daemon):
    old = daemon.worker("slow").pid
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(embed, daemon, "slow", *"abcdef")
        wait_for(lambda: daemon.worker("slow").pool.sequences_active == 1, what="the request to run")
        os.kill(old, signal.SIGKILL)
        reply = running.result()
    assert len(reply.embeddings) == 6 and reply.worker_pid not in (0, old)
    assert "request_retried" in daemon.log()


def test_llmctl_embed_prints_a_vector_a_line(daemon):
    plain = llmctl(daemon, "embed", "emb", "hello world", "the cache")
    assert plain.returncode == 0, plain.stderr
    vectors = [json.loads(line) for line in plain.stdout.splitlines()]
    assert len(vectors) == 2 and vectors[0] == list(embed(daemon, "emb", "hello world").embeddings[0].values)
    objects = [json.loads(line) for line in llmctl(daemon, "--json", "embed", "emb", "hi").stdout.splitlines()]
    assert objects[0]["index"] == 0 and len(objects[0]["embedding"]) == len(vectors[0])
    assert objects[-1]["model"] == "emb" and objects[-1]["prompt_tokens"] > 0
    refused = llmctl(daemon, "embed", "tiny", "hi")
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr


# -- pure ----------------------------------------------------------------------------------------------
def test_pooling_is_the_ggufs_own_else_mean_and_a_reranker_is_refused():
    assert pooling_of({"general.architecture": "bert", "bert.pooling_type": "2"}) == POOLING_CLS
    assert pooling_of({"general.architecture": "qwen3", "qwen3.pooling_type": "3"}) == POOLING_LAST
    assert pooling_of({"general.architecture": "llama"}) == POOLING_MEAN
    assert pooling_of({"general.architecture": "bert", "bert.pooling_type": "0"}) == POOLING_MEAN  # per token: no
    with pytest.raises(EngineError, match="reranker"):
        pooling_of({"general.architecture": "bert", "bert.pooling_type": "4"})
    assert unit([3.0, 4.0]) == [0.6, 0.8] and unit([0.0, 0.0]) == [0.0, 0.0]


def test_the_estimate_sizes_an_embedding_worker_for_a_whole_input_in_one_batch(model_dir):
    shape = read_gguf_info(model_dir / "tiny.gguf").shape
    generating = estimate(shape, ModelConfig("m", "tiny.gguf", n_ctx=8192))
    embedding = estimate(shape, ModelConfig("m", "tiny.gguf", n_ctx=8192, embedding=True))
    # The same warm-up (one n_batch), but a full context's attention in one batch at the peak.
    assert embedding.compute_cpu_peak > 4 * generating.compute_cpu_peak
    assert embedding.parallel == 1 and embedding.kv_cpu == generating.kv_cpu


# -- the worker's service with a scripted embedder --------------------------------------------------------
class ScriptedEmbedder:
    """One token per character; a vector of [length, 1]; `gate` holds each input until the test lets it go."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.embedded: list[int] = []

    def tokenize(self, text, add_special):
        return [ord(c) for c in text]

    def embed(self, tokens):
        self.gate.acquire()
        self.embedded.append(len(tokens))
        return unit([float(len(tokens)), 1.0])

    def warm_up(self):
        pass


@pytest.fixture
def scripted():
    engine, beats = ScriptedEmbedder(), []
    info = EngineInfo(n_ctx=8, n_batch=8, n_threads=1, architecture="fake", has_chat_template=False, parallel=1)
    service = EmbeddingService("fake", engine, info, beats.append)
    server = grpc_testing.server_from_dictionary({SERVICE: service}, grpc_testing.strict_real_time())
    yield server, engine, beats
    for _ in range(16):
        engine.gate.release()
    service.close()


def unary(server, method: str, request):
    return server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, None)


def test_the_worker_beats_before_each_input_and_after_the_last(scripted):
    server, engine, beats = scripted
    rpc = unary(server, "Embed", pb.EmbedRequest(model="fake", input=["ab", "abcd", "a"]))
    for _ in range(3):
        engine.gate.release()
    reply, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK and reply.prompt_tokens == 7 and len(reply.embeddings) == 3
    assert [(b.active, b.cells) for b in beats] == [(1, 2), (1, 4), (1, 1), (0, 0)]
    assert beats[-1].cells_high == 4


def test_the_worker_cuts_with_truncate_and_otherwise_names_the_input_too_long(scripted):
    server, engine, _ = scripted
    rpc = unary(server, "Embed", pb.EmbedRequest(model="fake", input=["ok", "x" * 9]))
    _, _, code, details = rpc.termination()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input[1] is 9 tokens" in details and "(n_ctx)" in details
    assert engine.embedded == []  # checked before any input was computed
    engine.gate.release()
    rpc = unary(server, "Embed", pb.EmbedRequest(model="fake", input=["x" * 9], truncate=True))
    reply, _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK and engine.embedded == [8] and reply.prompt_tokens == 8


def test_a_cancelled_request_stops_before_its_next_input(scripted):
    server, engine, beats = scripted
    rpc = unary(server, "Embed", pb.EmbedRequest(model="fake", input=["a", "b", "c"]))
    wait_for(lambda: beats, what="the first input to start")
    rpc.cancel()
    engine.gate.release()  # the first input ends; the next are not computed
    wait_for(lambda: beats[-1].active == 0, what="the request to stop")
    assert engine.embedded == [1]


def test_an_embedding_worker_refuses_generate_and_still_tokenizes_and_informs(scripted):
    server, _, _ = scripted
    rpc = server.invoke_unary_stream(SERVICE.methods_by_name["Generate"], (),
                                     worker_pb2.WorkerGenerateRequest(prompt="hi"), None)
    _, code, details = rpc.termination()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "is an embedding model" in details
    rpc = unary(server, "Tokenize", pb.TokenizeRequest(text="abc"))
    assert rpc.termination()[0].count == 3
    rpc = unary(server, "Info", worker_pb2.WorkerInfoRequest())
    info = rpc.termination()[0]
    assert info.embedding and info.parallel == 1 and info.n_ctx == 8
