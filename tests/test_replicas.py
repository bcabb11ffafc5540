"""Replicas: several workers per model, sharing the mmap'd weights, each request to the least loaded."""

from __future__ import annotations

import os
import signal
import tempfile
import shutil
from pathlib import Path

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.demo_model import ModelShape, write_model
from tests.conftest import in_background, launch, model_table, wait_for
from tests.test_llmctl import llmctl

WEIGHTS = ModelShape(n_embd=512, n_layer=4, n_head=8, n_head_kv=8, n_ff=1024)  # ~36 MB of weights


@pytest.fixture(scope="module")
def replica_dir():
    directory = Path(tempfile.mkdtemp(prefix="llms-replicas-"))
    write_model(directory / "shared.gguf", WEIGHTS)
    write_model(directory / "alone.gguf", WEIGHTS, seed=1)
    write_model(directory / "tiny.gguf")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def mapping(pid: int, path: Path) -> dict[str, int]:
    """/proc/PID/smaps figures (kB) of the mapping of `path`: who shares its resident pages. Shared and
    private count clean and dirty pages together: a file the test just wrote is still dirty in the page
    cache. Pss divides each page by the number of processes mapping it."""
    figures: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.split()[0].rstrip(":") in ("Rss", "Pss", "Shared_Clean", "Shared_Dirty",
                                                            "Private_Clean", "Private_Dirty"):
                key = line.split()[0].rstrip(":").split("_")[0]
                figures[key] = figures.get(key, 0) + int(line.split()[1])
    return figures


def workers(daemon, model: str) -> list[pb.WorkerStatus]:
    return [w for w in daemon.stub.Status(pb.StatusRequest()).workers if w.model == model]


def test_replicas_share_the_weights_pages_and_add_only_their_private_memory(replica_dir):
    daemon = launch(replica_dir, model_table("shared", "shared.gguf", n_ctx=256, replicas=2) + "\n"
                    + model_table("alone", "alone.gguf", n_ctx=256))
    try:
        pair, (single,) = workers(daemon, "shared"), workers(daemon, "alone")
        assert [w.replica for w in pair] == [0, 1] and len({w.pid for w in pair}) == 2
        for w in pair:  # the file's resident pages are mapped by both: shared, not each its own copy
            pages = mapping(w.pid, replica_dir / "shared.gguf")
            assert pages["Rss"] > 30_000 and pages["Shared"] >= 0.9 * pages["Rss"], pages
            assert 0.4 < pages["Pss"] / pages["Rss"] < 0.6, pages  # each page counted half to each replica
        alone = mapping(single.pid, replica_dir / "alone.gguf")
        assert alone["Private"] >= 0.9 * alone["Rss"] and alone["Pss"] >= 0.9 * alone["Rss"], alone
        # Each replica costs its own private memory, about what a single worker of the model costs.
        for w in pair:
            assert 0.75 < w.private_memory_bytes / single.private_memory_bytes < 1.33
    finally:
        daemon.stop()


def test_requests_go_to_the_least_loaded_replica_and_survive_one_crashing(replica_dir):
    daemon = launch(replica_dir, model_table("tiny", "tiny.gguf", n_ctx=256, replicas=2,
                                             engine="tests.engines:SlowEngine"))
    try:
        ask = lambda tokens: daemon.stub.Generate(pb.GenerateRequest(  # noqa: E731
            model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=tokens, temperature=0)))
        first, first_result = in_background(ask(60))
        wait_for(lambda: any(w.state == "BUSY" for w in workers(daemon, "tiny")), what="one replica busy")
        second, second_result = in_background(ask(60))
        wait_for(lambda: [w.state for w in workers(daemon, "tiny")] == ["BUSY", "BUSY"], what="both replicas busy")
        first.join(30)
        second.join(30)
        pids = {first_result["chunks"][-1].worker_pid, second_result["chunks"][-1].worker_pid}
        assert len(pids) == 2  # side by side on two workers, not one after the other

        table = llmctl(daemon, "status").stdout
        assert "tiny#1" in table and "tiny#2" in table

        crashed = workers(daemon, "tiny")[0].pid
        os.kill(crashed, signal.SIGKILL)
        for _ in range(3):  # the other replica serves while the crashed one restarts
            assert list(ask(2))[-1].usage.completion_tokens == 2
        wait_for(lambda: all(w.state == "READY" and w.pid != crashed for w in workers(daemon, "tiny")),
                 what="the crashed replica to be replaced")
    finally:
        daemon.stop()


def test_reload_changes_the_number_of_replicas(replica_dir):
    daemon = launch(replica_dir, model_table("tiny", "tiny.gguf", n_ctx=256))
    try:
        config = daemon.base / "config.toml"
        config.write_text(config.read_text().replace('path = "tiny.gguf"', 'path = "tiny.gguf"\nreplicas = 3'))
        assert llmctl(daemon, "update").returncode == 0
        assert [w.state for w in workers(daemon, "tiny")] == ["READY"] * 3
        config.write_text(config.read_text().replace("replicas = 3", "replicas = 1"))
        assert llmctl(daemon, "update").returncode == 0
        assert len(workers(daemon, "tiny")) == 1
    finally:
        daemon.stop()
