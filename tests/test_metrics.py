"""Prometheus metrics scraped over HTTP and read with prometheus-client's own parser."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.config import ConfigError, parse_config
from tests.conftest import model_table, wait_for
from tests.test_config import HOST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_show_requests_tokens_latency_memory_and_recycles(start_daemon):
    port = free_port()
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), extra=f'[metrics]\naddress = "127.0.0.1:{port}"')
    for _ in range(3):
        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                     options=pb.SamplingOptions(max_tokens=4, temperature=0))))
    with pytest.raises(grpc.RpcError) as refused:
        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                     options=pb.SamplingOptions(max_tokens=100_000))))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    daemon.stub.RecycleModel(pb.RecycleModelRequest(name="tiny"))
    pid = daemon.worker("tiny").pid
    def polled():
        samples = scrape(port)
        return samples if value(samples, "llm_supervisor_worker_private_memory_bytes", model="tiny", pid=str(pid)) else None

    samples = wait_for(polled, what="a poll of the fresh worker")
    assert value(samples, "llm_supervisor_requests_total", model="tiny", code="OK", api="grpc") == 3
    assert value(samples, "llm_supervisor_requests_total", model="tiny", code="INVALID_ARGUMENT", api="grpc") == 1
    assert value(samples, "llm_supervisor_generated_tokens_total", model="tiny") == 12
    assert value(samples, "llm_supervisor_time_to_first_token_seconds_count", model="tiny") == 3
    assert value(samples, "llm_supervisor_tokens_per_second_count", model="tiny") == 3
    assert value(samples, "llm_supervisor_recycles_total", model="tiny", reason="by_hand") == 1
    assert value(samples, "llm_supervisor_restarts_total", model="tiny") == 0
    assert value(samples, "llm_supervisor_model_serving", model="tiny") == 1
    assert value(samples, "llm_supervisor_queue_depth", model="tiny") == 0
    assert value(samples, "llm_supervisor_worker_file_rss_bytes", model="tiny", pid=str(pid)) > 0
    # The fresh worker's batch: nothing running yet, its pool of n_ctx cells, `parallel` sequences at most.
    assert value(samples, "llm_supervisor_worker_sequences_parallel", model="tiny", pid=str(pid)) == 4
    assert value(samples, "llm_supervisor_worker_kv_cells", model="tiny", pid=str(pid)) == 512
    assert value(samples, "llm_supervisor_worker_sequences_active", model="tiny", pid=str(pid)) == 0
    assert value(samples, "llm_supervisor_worker_preemptions_total", model="tiny", pid=str(pid)) == 0


def test_a_bad_metrics_address_is_a_config_error():
    with pytest.raises(ConfigError, match="must be host:port"):
        parse_config('[metrics]\naddress = "localhost"', HOST)


def models_in(samples) -> set[str]:
    return {dict(labels)["model"] for _, labels in samples if "model" in dict(labels)}


def test_an_unloaded_model_leaves_the_scrape_and_the_others_stay(start_daemon):
    port = free_port()
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), extra=f'[metrics]\naddress = "127.0.0.1:{port}"')
    daemon.stub.LoadModel(pb.LoadModelRequest(name="extra", path="tiny.gguf", options={"n_ctx": "256"}))
    for model in ("tiny", "extra"):
        list(daemon.stub.Generate(pb.GenerateRequest(model=model, prompt="hello",
                                                     options=pb.SamplingOptions(max_tokens=2, temperature=0))))
    with pytest.raises(grpc.RpcError):
        list(daemon.stub.Generate(pb.GenerateRequest(model="extra", prompt="hello",
                                                     options=pb.SamplingOptions(max_tokens=100_000))))
    pid = daemon.worker("extra").pid

    def polled():
        samples = scrape(port)
        return samples if value(samples, "llm_supervisor_worker_private_memory_bytes", model="extra", pid=str(pid)) else None

    before = wait_for(polled, what="a poll of extra's worker")
    assert models_in(before) == {"tiny", "extra"}
    assert value(before, "llm_supervisor_requests_total", model="extra", code="INVALID_ARGUMENT", api="grpc") == 1

    daemon.stub.UnloadModel(pb.UnloadModelRequest(name="extra"))
    after = scrape(port)
    assert models_in(after) == {"tiny"}, sorted(name for name, labels in after if ("model", "extra") in labels)
    assert value(after, "llm_supervisor_requests_total", model="tiny", code="OK", api="grpc") == 1
    assert value(after, "llm_supervisor_generated_tokens_total", model="tiny") == 2
    assert value(after, "llm_supervisor_model_serving", model="tiny") == 1
