"""Models loaded through the API survive a restart of the daemon; config models need no record."""

from __future__ import annotations

import json
import threading

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.catalog import persisted as state
from tests.conftest import loaded_models, model_table, wait_for
from tests.inprocess import InProcessDaemon


def models_of(daemon) -> dict[str, pb.ModelInfo]:
    return {m.name: m for m in loaded_models(daemon)}


def test_a_model_loaded_at_run_time_is_loaded_again_after_a_restart(start_daemon, model_dir, tmp_path):
    kept = tmp_path / "state"
    first = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), state_dir=kept)
    first.stub.LoadModel(pb.LoadModelRequest(name="extra", path="tiny.gguf", options={"n_ctx": "256"}))
    first.stub.LoadModel(pb.LoadModelRequest(name="gone", path="tiny.gguf", options={"n_ctx": "256"}))
    first.stub.UnloadModel(pb.UnloadModelRequest(name="gone"))
    record = json.loads((kept / "models.json").read_text())
    assert record["models"] == [{"name": "extra", "path": "tiny.gguf", "options": {"n_ctx": "256"}}]
    first.stop()

    second = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), state_dir=kept)
    models = models_of(second)
    assert set(models) == {"tiny", "extra"}
    assert models["extra"].source == "state" and models["extra"].n_ctx == 256 and models["extra"].state == "READY"
    assert models["tiny"].source == "config"
    reply = list(second.stub.Generate(pb.GenerateRequest(model="extra", prompt="hi",
                                                         options=pb.SamplingOptions(max_tokens=3))))
    assert reply[-1].usage.completion_tokens == 3
    second.stub.UnloadModel(pb.UnloadModelRequest(name="extra"))
    second.stop()

    third = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), state_dir=kept)
    assert set(models_of(third)) == {"tiny"}


def test_the_config_wins_over_a_recorded_model_of_the_same_name(start_daemon, tmp_path):
    kept = tmp_path / "state"
    state.save(kept / "models.json", [state.LoadedModel("tiny", "tiny.gguf", {"n_ctx": "256"})])
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), state_dir=kept)
    assert models_of(daemon)["tiny"].source == "config" and models_of(daemon)["tiny"].n_ctx == 512
    assert "state_model_skipped" in daemon.log()


def test_a_damaged_record_is_set_aside_and_the_daemon_starts(start_daemon, tmp_path):
    kept = tmp_path / "state"
    kept.mkdir()
    (kept / "models.json").write_text('{"version": 1, "models": [{"name": ')
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), state_dir=kept)
    assert set(models_of(daemon)) == {"tiny"}
    assert (kept / "models.json.damaged").exists() and "state_damaged" in daemon.log()


def test_a_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "models.json"
    state.save(path, [state.LoadedModel("a", "a.gguf")])
    state.save(path, [state.LoadedModel("b", "b.gguf", {"n_ctx": "512"})])
    assert state.load(path) == [state.LoadedModel("b", "b.gguf", {"n_ctx": "512"})]
    assert [p.name for p in tmp_path.iterdir()] == ["models.json"]  # no temporary file left behind


def test_the_daemon_answers_while_a_record_is_written_and_records_keep_their_order(model_dir, monkeypatch):
    daemon = InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512))
    record = daemon.base / "state" / "models.json"
    wait_for(record.exists, what="the record made at start-up")  # before the writes below are noted
    writing, release = threading.Event(), threading.Event()
    written: list[list[str]] = []
    asked: list[list[str]] = []
    real_write, real_record = state.write_atomically, state.record

    def slow_first_write(path, text) -> None:
        written.append([m["name"] for m in json.loads(text)["models"]])
        if len(written) == 1:  # a slow fsync, held until the test has seen the daemon go on meanwhile
            writing.set()
            assert release.wait(20), "the first record's write was never released"
        real_write(path, text)

    async def noted_record(path, models) -> None:
        asked.append([m.name for m in models])
        await real_record(path, models)

    monkeypatch.setattr(state, "write_atomically", slow_first_write)
    monkeypatch.setattr(state, "record", noted_record)
    try:
        first = daemon.stub.LoadModel.future(pb.LoadModelRequest(name="a", path="tiny.gguf", options={"n_ctx": "256"}))
        wait_for(writing.is_set, timeout=60, what="the record of model a to be written")
        listed = daemon.stub.ListModels(pb.ListModelsRequest(), timeout=5)  # the event loop is not held by the write
        assert {m.name for m in listed.models if m.state != "AVAILABLE"} == {"tiny", "a"}

        second = daemon.stub.LoadModel.future(pb.LoadModelRequest(name="b", path="tiny.gguf", options={"n_ctx": "256"}))
        wait_for(lambda: ["a", "b"] in asked, timeout=60, what="the record of model b to be asked for")
        release.set()
        first.result(timeout=30), second.result(timeout=30)
        # The newer record is written after the older one, however long the older one took.
        assert written == [["a"], ["a", "b"]]
        assert [m.name for m in state.load(record)] == ["a", "b"]
    finally:
        release.set()
        daemon.stop()
