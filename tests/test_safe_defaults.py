"""A config that sets no memory key — how most people run it — still protects the machine: every worker
has derived lines, a leak is recycled, and a conversation that fills the context is not taken for one."""

from __future__ import annotations

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.demo_model import ModelShape, write_model
from tests.conftest import launch, model_table, wait_for

MiB = 1 << 20
# Wide enough that filling an 8192-token context grows the worker by more than the leak threshold.
WIDE = ModelShape(n_embd=256, n_layer=4, n_head=8, n_head_kv=8, n_ff=512)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide")
    write_model(directory / "wide.gguf", WIDE)
    return directory


def test_no_memory_key_still_gives_every_worker_derived_lines_shown_in_status(shared_daemon):
    worker = shared_daemon.worker("tiny")
    lines = worker.memory_lines
    assert dict(lines.source) == {"max_private_memory": "derived", "rlimit_data": "derived",
                                  "leak_threshold": "derived", "max_gpu_memory": "off"}
    assert worker.private_memory_bytes < lines.max_private_memory_bytes < lines.hard_private_memory_bytes
    assert lines.leak_threshold_bytes >= 64 * MiB
    with open(f"/proc/{worker.pid}/limits") as f:  # the kernel's line is really set on the process
        data = next(line for line in f if line.startswith("Max data size")).split()
    assert int(data[3]) == lines.rlimit_data_bytes
    model = shared_daemon.stub.ListModels(pb.ListModelsRequest()).models[0]
    assert model.memory_lines.source["max_private_memory"] == "derived"


def test_a_conversation_that_fills_the_context_over_20_turns_causes_no_recycle(wide_dir):
    daemon = launch(wide_dir, model_table("wide", "wide.gguf", n_ctx=8192), extra='poll_interval = "100ms"')
    try:
        pid = daemon.worker("wide").pid
        one = daemon.stub.Tokenize(pb.TokenizeRequest(model="wide", text="the model memory " * 50)).count
        turn = "the model memory " * int(50 * (8192 // 20 - 16) / one)  # 1/20 of the context a turn
        history: list[pb.ChatMessage] = []
        for _ in range(20):
            history.append(pb.ChatMessage(role="user", content=turn))
            chunks = list(daemon.stub.Chat(pb.ChatRequest(model="wide", messages=history,
                                                          options=pb.SamplingOptions(max_tokens=8)), timeout=120))
            history.append(pb.ChatMessage(role="assistant", content="".join(c.text for c in chunks)))
        last = chunks[-1].usage
        assert last.prompt_tokens > 7000  # the context really filled up
        worker = daemon.worker("wide")
        assert worker.pid == pid and worker.recycles == 0, worker.last_recycle_reason
        assert '"worker_recycle"' not in daemon.log()
    finally:
        daemon.stop()


def test_a_leak_of_2_mib_a_request_is_recycled_on_defaults_without_a_failed_request(model_dir, start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512, engine="tests.engines:LeakyEngine"),
                          env={"TEST_LEAK_MIB": "2", "TEST_TOKEN_DELAY": "0"}, extra='poll_interval = "100ms"')
    first = daemon.worker("tiny").pid
    for n in range(1, 31):
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hello",
                                                              options=pb.SamplingOptions(max_tokens=2))))
        assert chunks[-1].usage.completion_tokens == 2  # every request succeeds, before and after the recycle
        if daemon.worker("tiny").recycles:
            break
    worker = wait_for(lambda: (w := daemon.worker("tiny")).state == "READY" and w, what="the replacement")
    assert worker.recycles == 1 and n <= 20, (n, worker.recycles)
    assert "leak" in worker.last_recycle_reason and "MiB/request" in worker.last_recycle_reason
    assert worker.pid != first
    assert '"graceful": true' in daemon.log() and "leak_threshold" in daemon.log()
