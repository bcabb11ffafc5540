"""The catalog: every GGUF in the model directories and every model of an Ollama store, by name, loaded
by the first request for it. Stores are made here as Ollama lays them out: manifests and blobs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.catalog.catalog import scan
from tests.conftest import HTTP, launch, loaded_models, wait_for

MODEL = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"


def put_blob(store: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return digest


def put_model(store: Path, name: str, tag: str, gguf: bytes, params: dict | None = None, system: str = "",
              namespace: str = "library") -> None:
    layers = [{"mediaType": MODEL, "digest": put_blob(store, gguf), "size": len(gguf)}]
    if params is not None:
        layers.append({"mediaType": PARAMS, "digest": put_blob(store, json.dumps(params).encode())})
    if system:
        layers.append({"mediaType": SYSTEM, "digest": put_blob(store, system.encode())})
    manifest = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


def models_holding(tmp_path: Path, model_dir: Path, *names: str) -> Path:
    """A model directory with the tiny model under each of these names."""
    models = tmp_path / "models"
    models.mkdir()
    for name in names:
        shutil.copy(model_dir / "tiny.gguf", models / f"{name}.gguf")
    return models


def at_once(n: int, call) -> list:
    """`call()` from n threads released together: each one's result, or (code, details) of its error."""
    outcomes: list = []
    barrier = threading.Barrier(n)

    def one() -> None:
        barrier.wait()
        try:
            outcomes.append(call())
        except grpc.RpcError as e:
            outcomes.append((e.code(), e.details()))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


@pytest.fixture
def store(tmp_path, model_dir) -> Path:
    store = tmp_path / "ollama"
    put_model(store, "tiny", "latest", (model_dir / "tiny.gguf").read_bytes(),
              params={"num_ctx": 768, "stop": ["<|end|>"]}, system="You are terse.")
    put_model(store, "tiny", "q8", (model_dir / "tiny.gguf").read_bytes())
    put_model(store, "other", "1b", (model_dir / "tiny.gguf").read_bytes(), namespace="someone")
    return store


def test_a_store_is_read_as_ollama_names_it(store):
    found = scan([store])
    assert sorted(found.models) == ["someone/other:1b", "tiny:latest", "tiny:q8"]
    tiny = found.models["tiny:latest"]
    assert tiny.source == "ollama" and tiny.path.parent == (store / "blobs").resolve()
    assert tiny.params["num_ctx"] == 768 and tiny.system == "You are terse." and not found.problems


def test_a_malformed_manifest_or_an_escaping_blob_is_skipped_and_named(store, tmp_path):
    bad = store / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    digest = "sha256:" + "ab" * 32
    os.symlink(outside, store / "blobs" / digest.replace(":", "-"))
    escaping = store / "manifests" / "registry.ollama.ai" / "library" / "escape" / "latest"
    escaping.parent.mkdir(parents=True)
    escaping.write_text(json.dumps({"layers": [{"mediaType": MODEL, "digest": digest}]}))
    sneaky = store / "manifests" / "registry.ollama.ai" / "library" / "sneaky" / "latest"
    sneaky.parent.mkdir(parents=True)
    sneaky.write_text(json.dumps({"layers": [{"mediaType": MODEL, "digest": "sha256:../../outside"}]}))
    found = scan([store])
    assert "broken:latest" not in found.models and "escape:latest" not in found.models
    assert "sneaky:latest" not in found.models and "tiny:latest" in found.models
    problems = "\n".join(found.problems)
    assert str(bad) in problems and str(escaping) in problems and "outside the store" in problems
    assert str(sneaky) in problems and "not sha256" in problems


def test_an_adapter_layer_or_a_symlinked_blobs_directory_is_refused(store, tmp_path, model_dir):
    put_model(store, "vision", "latest", (model_dir / "tiny.gguf").read_bytes())
    put_model(store, "tuned", "latest", (model_dir / "tiny.gguf").read_bytes())
    for name, media in (("vision", "projector"), ("tuned", "adapter")):
        manifest = store / "manifests" / "registry.ollama.ai" / "library" / name / "latest"
        layers = json.loads(manifest.read_text())["layers"]
        layers.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": put_blob(store, media.encode())})
        manifest.write_text(json.dumps({"layers": layers}))
    found = scan([store])
    assert "vision:latest" in found.models  # its text model serves; images are refused by name
    assert "tuned:latest" not in found.models and any("adapter" in p and "tuned" in p for p in found.problems)
    # blobs/ moved to another disk and linked back: every blob would lie outside the store.
    elsewhere = tmp_path / "bigdisk"
    shutil.move(store / "blobs", elsewhere)
    os.symlink(elsewhere, store / "blobs")
    found = scan([store])
    assert found.models == {} and found.problems == (
        f"{store.resolve() / 'blobs'}: a symlink; a store's blobs must lie in the store (point model_dirs at the real "
        f"store, or link the whole store instead); skipped",)
    # The whole store linked from elsewhere is fine: it is read where it lies.
    shutil.move(elsewhere, tmp_path / "blobs-back")
    (store / "blobs").unlink()
    shutil.move(tmp_path / "blobs-back", store / "blobs")
    os.symlink(store, tmp_path / "linked-store")
    assert "tiny:latest" in scan([tmp_path / "linked-store"]).models


def test_a_stores_values_this_daemon_does_not_take_are_left_out_and_the_model_serves(store, model_dir):
    put_model(store, "odd", "latest", (model_dir / "tiny.gguf").read_bytes(),
              params={"temperature": "hot", "top_k": -1, "repeat_penalty": 0, "num_ctx": 8,
                      "stop": [f"s{i}" for i in range(40)], "top_p": 0.5, "num_predict": 64})
    daemon = launch(store)
    try:
        listed = {m.name: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["odd:latest"].estimate.private_peak_bytes > 0  # its settings could be had
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="odd", prompt="hi",
                                                              options=pb.SamplingOptions(max_tokens=3))))
        assert chunks[-1].usage.completion_tokens == 3
        config = daemon.stub.ListModels(pb.ListModelsRequest())
        assert {m.name: m.n_ctx for m in config.models}["odd:latest"] == listed["tiny:q8"].n_ctx  # num_ctx 8 left out
        log = daemon.log()
        ignored = [json.loads(line) for line in log.splitlines() if '"catalog_param_ignored"' in line]
        assert sorted(e["key"] for e in ignored) == ["n_ctx", "num_predict", "repeat_penalty", "temperature",
                                                    "top_k"], ignored
        # Ollama takes any number of stop words, the config at most 16: the first 16 are taken.
        assert "stop" not in [e["key"] for e in ignored]
    finally:
        daemon.stop()


def test_gguf_names_and_collisions(tmp_path, model_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    shutil.copy(model_dir / "tiny.gguf", first / "My Model (v2).gguf")
    shutil.copy(model_dir / "tiny.gguf", second / "My Model (v2).gguf")
    found = scan([first, second])
    assert list(found.models) == ["My_Model__v2_"]
    assert found.models["My_Model__v2_"].path.parent == first.resolve()
    assert any("is taken by" in p and str(second) in p for p in found.problems)


def test_store_models_generate_by_name_with_no_load_and_take_num_ctx(store):
    daemon = launch(store, extra=HTTP)
    try:
        listed = {m.name: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["tiny:latest"].state == "AVAILABLE" and listed["tiny:latest"].source == "ollama"
        assert listed["tiny:latest"].quantization == "F32" and listed["tiny:latest"].context_length > 0
        assert listed["tiny:latest"].n_ctx == 768 and listed["tiny:latest"].estimate.private_peak_bytes > 0
        for name in ("tiny:latest", "tiny"):  # a name alone means name:latest
            chunks = list(daemon.stub.Generate(pb.GenerateRequest(model=name, prompt="hi",
                                                                  options=pb.SamplingOptions(max_tokens=3))))
            assert chunks[-1].usage.completion_tokens == 3
        assert [m.name for m in loaded_models(daemon)] == ["tiny:latest"]  # one load, under its full name
        assert daemon.stub.Tokenize(pb.TokenizeRequest(model="tiny:q8", text="hello")).count > 0  # loads it too
        assert sorted(m.name for m in loaded_models(daemon)) == ["tiny:latest", "tiny:q8"]
        assert daemon.worker("tiny:latest").pool.n_ctx == 768  # the params layer's num_ctx, not the default
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="someone/other:1b", prompt="hi",
                                                              options=pb.SamplingOptions(max_tokens=2))))
        assert chunks[-1].usage.completion_tokens == 2
        assert '"model_loaded"' in daemon.log() and '"origin": "ollama"' in daemon.log()
    finally:
        daemon.stop()


def test_a_gguf_copied_in_while_running_is_served_and_concurrent_first_requests_share_one_load(tmp_path, model_dir):
    models = tmp_path / "models"
    models.mkdir()
    daemon = launch(models)
    try:
        with pytest.raises(grpc.RpcError) as missing:
            list(daemon.stub.Generate(pb.GenerateRequest(model="fresh", prompt="hi")))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        shutil.copy(model_dir / "tiny.gguf", models / ".fresh.tmp")
        os.rename(models / ".fresh.tmp", models / "fresh.gguf")
        def ask() -> tuple[int, float]:
            usage = list(daemon.stub.Generate(pb.GenerateRequest(model="fresh", prompt="hi",
                                                                 options=pb.SamplingOptions(max_tokens=2))))[-1].usage
            return usage.completion_tokens, usage.load_s

        # The miss above was just now: the scan a miss asks for waits its turn, and sees the new file.
        outcomes = at_once(3, ask)
        assert [tokens for tokens, _ in outcomes] == [2, 2, 2], outcomes
        waits = [wait for _, wait in outcomes]
        assert daemon.log().count('"worker_spawned"') == 1  # one load for the three
        # Each waited for that load, and its usage says for how long; the next request waited for none.
        loaded = json.loads(next(line for line in daemon.log().splitlines() if '"model_loaded"' in line))
        assert all(0 < wait for wait in waits) and max(waits) >= loaded["load_s"] * 0.5, (waits, loaded)
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="fresh", prompt="hi",
                                                              options=pb.SamplingOptions(max_tokens=2))))
        assert chunks[-1].usage.load_s == 0
    finally:
        daemon.stop()


def test_requests_waiting_for_a_load_on_demand_are_bounded_by_max_queue(tmp_path, model_dir):
    models = models_holding(tmp_path, model_dir, "cold")
    # One request at a time, one waiting: the third and fourth asking while it loads are refused, as they
    # would be for a loaded model, rather than waiting in a line nothing bounds.
    daemon = launch(models, extra="standby_workers = 0\n[defaults]\nparallel = 1\nmax_queue = 1\n")
    try:
        refused_at: list[float] = []

        def ask() -> int:
            try:
                return list(daemon.stub.Generate(pb.GenerateRequest(model="cold", prompt="hi", options=pb.SamplingOptions(
                    max_tokens=48)), timeout=120))[-1].usage.completion_tokens
            except grpc.RpcError:
                refused_at.append(time.time())
                raise

        outcomes = at_once(4, ask)
        served = [o for o in outcomes if o == 48]
        refused = [o for o in outcomes if o != 48]
        assert len(served) == 2 and len(refused) == 2, outcomes
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
                   for code, details in refused), refused
        assert daemon.log().count('"worker_spawned"') == 1
        # Refused at once, not after waiting out the load.
        loaded = json.loads(next(line for line in daemon.log().splitlines() if '"model_loaded"' in line))
        assert max(refused_at) < datetime.fromisoformat(loaded["timestamp"]).timestamp(), (refused_at, loaded)
    finally:
        daemon.stop()


def test_a_load_on_demand_that_admission_refuses_is_resource_exhausted_with_the_figures(tmp_path, model_dir):
    models = models_holding(tmp_path, model_dir, "big")
    daemon = launch(models, extra=f"memory_budget = {1 << 20}\n[defaults]\nparallel = 2\n")  # 1 MiB: none fits
    try:
        for _ in range(2):  # refused again, not FATAL: memory may be free at the next request
            # Five at once: two share the start, three queue behind them; each is told the refusal itself.
            outcomes = at_once(5, lambda: list(daemon.stub.Generate(pb.GenerateRequest(model="big", prompt="hi"),
                                                                    timeout=60)))
            assert len(outcomes) == 5 and all(
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and "does not fit" in details
                and "memory_budget is 1.0 MiB" in details for code, details in outcomes), outcomes
        # One admission per round: a request queued on a load that failed never starts one of its own.
        wait_for(lambda: daemon.log().count('"load_on_demand_failed"') == 2, 10, what="two refusals logged")
        starts = [line for line in daemon.log().splitlines() if '"replica_state"' in line and '"new": "STARTING"' in line]
        assert len(starts) == 2, starts
        assert loaded_models(daemon) == []
        assert [m.state for m in daemon.stub.ListModels(pb.ListModelsRequest()).models] == ["AVAILABLE"]
    finally:
        daemon.stop()


def test_a_model_with_two_replicas_of_which_one_does_not_fit_serves_no_request_it_then_cuts(tmp_path, model_dir):
    models = models_holding(tmp_path, model_dir, "pair")
    probe = launch(models, extra="[defaults]\nparallel = 1\n")
    try:
        list(probe.stub.Generate(pb.GenerateRequest(model="pair", prompt="hi", options=pb.SamplingOptions(max_tokens=1))))
        peak = loaded_models(probe)[0].estimate.private_peak_bytes
    finally:
        probe.stop()
    # Room for one replica, not two: the load fails whole, and no request may have started on the first.
    daemon = launch(models, extra=f"memory_budget = {int(peak * 1.5)}\nstandby_workers = 0\n"
                                  f"[defaults]\nparallel = 1\nreplicas = 2\n")
    try:
        outcomes: list = []

        def ask() -> None:
            try:
                list(daemon.stub.Generate(pb.GenerateRequest(model="pair", prompt="hi",
                                                             options=pb.SamplingOptions(max_tokens=8)), timeout=60))
                outcomes.append("served")
            except grpc.RpcError as e:
                outcomes.append(e.code())

        threads = [threading.Thread(target=ask)]
        threads[0].start()
        # Listed while its first replica loads: requests now must still wait for the whole load's outcome.
        wait_for(lambda: any(m.name == "pair" and m.state != "AVAILABLE"
                             for m in daemon.stub.ListModels(pb.ListModelsRequest()).models), 30, interval=0.005,
                 what="the load to list the model")
        threads += [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert outcomes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, outcomes
        assert loaded_models(daemon) == []
    finally:
        daemon.stop()


def test_two_models_alternate_under_a_budget_for_one(tmp_path, model_dir):
    models = models_holding(tmp_path, model_dir, "one", "two")
    probe = launch(models)
    try:
        list(probe.stub.Generate(pb.GenerateRequest(model="one", prompt="hi", options=pb.SamplingOptions(max_tokens=1))))
        peak = {m.name: m for m in loaded_models(probe)}["one"].estimate.private_peak_bytes
    finally:
        probe.stop()
    # Room for one model's worker at its peak, not two.
    daemon = launch(models, extra=f"memory_budget = {int(peak * 1.5)}\nstandby_workers = 0\n")
    try:
        for name in ("one", "two") * 3:
            chunks = list(daemon.stub.Generate(pb.GenerateRequest(model=name, prompt="hi",
                                                                  options=pb.SamplingOptions(max_tokens=2)),
                                               timeout=120))
            assert chunks[-1].usage.completion_tokens == 2
        assert '"model_evicted"' in daemon.log()
    finally:
        daemon.stop()


def test_a_config_model_unloaded_by_hand_stays_available_with_its_settings(tmp_path, model_dir):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_dir / "tiny.gguf", models / "tiny.gguf")
    # A name that is not its file's stem: only the config says the model exists.
    daemon = launch(models, models='[models.helper]\npath = "tiny.gguf"\nn_ctx = 1024\n')
    try:
        daemon.stub.UnloadModel(pb.UnloadModelRequest(name="helper"))
        listed = {m.name: m for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["helper"].state == "AVAILABLE" and listed["helper"].source == "config"
        assert listed["helper"].n_ctx == 1024 and listed["tiny"].state == "AVAILABLE"
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="helper", prompt="hi",
                                                              options=pb.SamplingOptions(max_tokens=2))))
        assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].usage.load_s > 0
        assert daemon.worker("helper").pool.n_ctx == 1024  # its own settings, not [defaults]
        assert {m.name: m.source for m in loaded_models(daemon)} == {"helper": "config"}  # a reload's to manage
        assert "is taken by" not in daemon.log()  # [models.NAME] and a stem naming one file do not clash
    finally:
        daemon.stop()


def test_load_on_demand_off_keeps_not_found(tmp_path, model_dir):
    models = models_holding(tmp_path, model_dir, "idle")
    daemon = launch(models, extra="load_on_demand = false\n")
    try:
        with pytest.raises(grpc.RpcError) as missing:
            list(daemon.stub.Generate(pb.GenerateRequest(model="idle", prompt="hi")))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert [m.state for m in daemon.stub.ListModels(pb.ListModelsRequest()).models] == ["AVAILABLE"]
    finally:
        daemon.stop()


def test_llmctl_models_lists_what_is_on_disk(store):
    import subprocess
    import sys

    from tests.conftest import ROOT

    daemon = launch(store)
    try:
        def llmctl(*args: str) -> str:
            return subprocess.run([sys.executable, "-m", "supervisor.ctl.main", "--address", daemon.address, *args],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                  timeout=60, check=True).stdout

        listed = llmctl("models", "--available")
        assert "tiny:latest" in listed and "AVAILABLE" in listed and "ollama" in listed and "F32" in listed
        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny:q8", prompt="hi", options=pb.SamplingOptions(max_tokens=1))))
        assert "tiny:q8" not in llmctl("models", "--available") and "tiny:q8" in llmctl("models")
    finally:
        daemon.stop()


def test_a_loaded_models_file_deleted_or_replaced_is_reported_and_the_worker_serves_on(store, model_dir):
    daemon = launch(store)
    try:
        def generate(name: str) -> int:
            return list(daemon.stub.Generate(pb.GenerateRequest(model=name, prompt="hi", options=pb.SamplingOptions(
                max_tokens=2))))[-1].usage.completion_tokens

        assert generate("someone/other:1b") == 2 and generate("tiny:q8") == 2  # one blob, both loaded from it
        blob = daemon.worker("tiny:q8")  # the worker is up; now `ollama pull` moves the tag, then prunes
        old = {m.name: m.path for m in loaded_models(daemon)}["tiny:q8"]
        put_model(store, "tiny", "q8", (model_dir / "tiny.gguf").read_bytes() + b"\0" * 64)  # a new blob
        Path(old).unlink()
        def reported() -> bool:
            daemon.stub.ListModels(pb.ListModelsRequest())  # a listing rescans (once a second at most)
            return '"model_file_changed"' in daemon.log() and '"model_file_missing"' in daemon.log()

        wait_for(reported, 10, what="the reports")
        assert generate("tiny:q8") == 2 and daemon.worker("tiny:q8").pid == blob.pid  # serves on from its mapping
        problems = daemon.stub.ScanCatalog(pb.ScanCatalogRequest()).problems
        assert any("tiny:q8" in p and "is gone" in p for p in problems)
        assert any("tiny:q8" in p and "until it is unloaded" in p for p in problems)
        assert daemon.log().count('"model_file_changed"') == 1  # told once, not at every scan
        daemon.stub.UnloadModel(pb.UnloadModelRequest(name="tiny:q8"))
        listed = {m.name: m.path for m in daemon.stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["tiny:q8"] != old  # the next request would load the new blob
    finally:
        daemon.stop()


def test_a_model_loaded_on_demand_follows_a_moved_tag_when_it_wakes_from_keep_alive(store, tmp_path):
    from supervisor.settings.demo_model import write_model

    daemon = launch(store, extra='poll_interval = "200ms"\n[defaults]\nkeep_alive = "1s"\n')
    try:
        def generate() -> int:
            return list(daemon.stub.Generate(pb.GenerateRequest(model="tiny:q8", prompt="hi", options=pb.SamplingOptions(
                max_tokens=2))))[-1].usage.completion_tokens

        def asleep() -> bool:
            return {m.name: m.state for m in loaded_models(daemon)}["tiny:q8"] == "EXITED"

        assert generate() == 2
        old = {m.name: m.path for m in loaded_models(daemon)}["tiny:q8"]
        wait_for(asleep, 20, what="keep_alive to unload it")
        assert generate() == 2 and '"model_file_followed"' not in daemon.log()  # unchanged: it wakes as it was
        wait_for(asleep, 20, what="keep_alive to unload it again")
        put_model(store, "tiny", "q8", write_model(tmp_path / "newer.gguf", seed=7).read_bytes())  # ollama pull
        wait_for(lambda: any("is its file on disk now" in p
                             for p in daemon.stub.ScanCatalog(pb.ScanCatalogRequest()).problems), 10,
                 what="the scan to see the new blob")
        assert generate() == 2  # it wakes on the new file, not the old one
        now = {m.name: m.path for m in loaded_models(daemon)}["tiny:q8"]
        assert now != old and Path(now).parent == (store / "blobs").resolve()
        assert '"model_file_followed"' in daemon.log()
    finally:
        daemon.stop()


def test_ollama_stop_on_a_model_not_loaded_loads_nothing(store):
    daemon = launch(store, extra=HTTP)
    try:
        def post(body: dict) -> tuple[int, dict]:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{daemon.http_url}/api/generate",
                                                                   data=json.dumps(body).encode()), timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, reply = post({"model": "tiny:q8", "keep_alive": 0})  # what `ollama stop tiny:q8` sends
        assert status == 200 and reply["done_reason"] == "unload"
        assert loaded_models(daemon) == [] and '"worker_spawned"' not in daemon.log()
        status, reply = post({"model": "nowhere", "keep_alive": 0})
        assert status == 404 and "nowhere" in reply["error"]
    finally:
        daemon.stop()


def test_a_store_with_nothing_servable_says_why(store, tmp_path):
    from supervisor.catalog.catalog import find_stores

    elsewhere = tmp_path / "bigdisk"
    shutil.move(store / "blobs", elsewhere)
    os.symlink(elsewhere, store / "blobs")
    (found,) = find_stores([(store, "asked")], [])
    assert found.models == 0 and "no model it holds can be served" in found.problem and "a symlink" in found.problem


def test_the_ollama_client_lists_shows_and_chats_with_a_quantized_store_model_on_defaults(tmp_path):
    import ollama

    from supervisor.settings.demo_model import CHAT_TEMPLATE, QUANTIZABLE, write_model
    from tests.conftest import quantize_beside

    # What an Ollama user has: a Q4_K_M blob whose template is many KB, a params layer, a system layer.
    made = tmp_path / "made"
    template = CHAT_TEMPLATE + "{# " + "padding " * 4_000 + "#}"
    quantize_beside(write_model(made / "f32.gguf", QUANTIZABLE, chat_template=template), ("Q4_K_M",))
    store = tmp_path / "ollama"
    put_model(store, "llama3.2", "3b", (made / "Q4_K_M.gguf").read_bytes(),
              params={"stop": ["<|eot_id|>", "user:"], "temperature": 0.6, "num_ctx": 1024}, system="Be brief.")
    daemon = launch(store, extra=HTTP)
    try:
        client = ollama.Client(host=daemon.http_url)
        listed = {m.model: m for m in client.list().models}
        assert listed["llama3.2:3b"].details.quantization_level == "Q4_K_M"
        shown = client.show("llama3.2:3b")
        assert "temperature 0.6" in shown.parameters and len(shown.template) > 30_000
        reply = client.chat("llama3.2:3b", messages=[{"role": "user", "content": "hi"}],
                            options={"num_predict": 8})  # default settings otherwise: the store's
        assert reply.message.content is not None and reply.eval_count > 0
        assert reply.load_duration > 0  # it loaded for this request, and says so
        assert [m.model for m in client.ps().models] == ["llama3.2:3b"]
        again = client.chat("llama3.2:3b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4})
        assert again.load_duration == 0 and [m.model for m in client.ps().models] == ["llama3.2:3b"]
        # OpenAI's client sees the same catalog.
        import openai

        oa = openai.OpenAI(base_url=f"{daemon.http_url}/v1", api_key="unused", max_retries=0)
        assert "llama3.2:3b" in [m.id for m in oa.models.list().data]
        completion = oa.chat.completions.create(model="llama3.2:3b", max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
        assert completion.usage.completion_tokens > 0
    finally:
        daemon.stop()


def test_llmctl_catalog_scan_offers_ollamas_stores_and_reads_none_unasked(store, tmp_path, model_dir):
    import subprocess
    import sys

    from tests.conftest import ROOT

    models, home = tmp_path / "models", tmp_path / "home"
    models.mkdir()
    shutil.copy(model_dir / "tiny.gguf", models / "mine.gguf")
    put_model(home / ".ollama" / "models", "homely", "latest", (model_dir / "tiny.gguf").read_bytes())
    (models / "broken.gguf").symlink_to(tmp_path / "nowhere.gguf")
    daemon = launch(models, env={"OLLAMA_MODELS": str(store), "HOME": str(home)})
    try:
        def llmctl(*args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "supervisor.ctl.main", "--address", daemon.address, *args],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        size = len((model_dir / "tiny.gguf").read_bytes())
        reply = daemon.stub.ScanCatalog(pb.ScanCatalogRequest(find_stores=True, paths=[str(tmp_path / "absent")]))
        stores = {s.found_by: s for s in reply.stores}
        assert set(stores) == {"OLLAMA_MODELS", "home directory", "asked"}  # /usr/share/ollama: none here
        assert (stores["OLLAMA_MODELS"].models, stores["OLLAMA_MODELS"].size_bytes) == (3, size)  # one blob, 3 tags
        assert not stores["OLLAMA_MODELS"].served and stores["home directory"].models == 1
        assert stores["asked"].problem == "does not exist" and reply.available == 1
        text = llmctl("catalog", "--scan")
        assert f"Ollama store {store} (OLLAMA_MODELS): 3 models" in text and "not served" in text
        assert f'add "{store}" to [supervisor] model_dirs in {daemon.base / "config.toml"}' in text
        # Offered, not read: nothing of either store is available until the operator adds it.
        assert [m.name for m in daemon.stub.ListModels(pb.ListModelsRequest()).models] == ["mine"]
        plain = llmctl("catalog")
        assert "1 models available" in plain and "Ollama store" not in plain
        assert "skipped:" not in plain  # a dangling link is no GGUF: not a model, not a problem
        with pytest.raises(grpc.RpcError) as relative:
            daemon.stub.ScanCatalog(pb.ScanCatalogRequest(paths=["models"]))
        assert relative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        daemon.stop()


def test_a_broken_store_costs_only_its_broken_parts(store, tmp_path, model_dir):
    manifests = store / "manifests" / "registry.ollama.ai" / "library"
    (manifests / "odd").mkdir()
    (manifests / "odd" / "latest").write_text(json.dumps({"layers": [{"mediaType": ["x"]}]}))  # unhashable
    (manifests / "deep").mkdir()
    (manifests / "deep" / "latest").write_text("[" * 200_000)
    (manifests / "fifo").mkdir()
    os.mkfifo(manifests / "fifo" / "latest")  # opened naively, it would hold the scan's thread for good
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(model_dir / "tiny.gguf", outside / "far.gguf")
    os.symlink(outside / "far.gguf", store / "far.gguf")  # a GGUF whose link leads out of the model directory
    daemon = launch(store)
    try:
        chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi",
                                                              options=pb.SamplingOptions(max_tokens=2))))
        assert chunks[-1].usage.completion_tokens == 2
        names = [m.name for m in daemon.stub.ListModels(pb.ListModelsRequest()).models]
        assert "tiny:latest" in names and not {"odd:latest", "deep:latest", "fifo:latest", "far"} & set(names)
        with pytest.raises(grpc.RpcError) as refused:
            list(daemon.stub.Generate(pb.GenerateRequest(model="far", prompt="hi")))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        log = daemon.log()
        for name in ("odd", "deep", "fifo"):
            assert str(manifests / name / "latest") in log
        assert "outside the model directories" in log
    finally:
        daemon.stop()


def test_a_model_that_fails_to_load_is_not_tried_again_at_once(tmp_path, model_dir):
    models = tmp_path / "models"
    models.mkdir()
    (models / "bad.gguf").write_bytes((model_dir / "tiny.gguf").read_bytes()[:4096])  # cut short
    daemon = launch(models)
    try:
        with pytest.raises(grpc.RpcError) as first:
            list(daemon.stub.Generate(pb.GenerateRequest(model="bad", prompt="hi")))
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE and "not a valid GGUF" in first.value.details()
        with pytest.raises(grpc.RpcError) as second:
            list(daemon.stub.Generate(pb.GenerateRequest(model="bad", prompt="hi")))
        assert second.value.code() == first.value.code() and "failed 0 s ago" in second.value.details()
        assert daemon.log().count('"load_on_demand_failed"') == 1
    finally:
        daemon.stop()


def test_a_stores_params_and_system_are_the_models_defaults(store, model_dir):
    daemon = launch(store, extra=HTTP)
    try:
        def chat(model: str, messages: list[tuple[str, str]], **options) -> list:
            return list(daemon.stub.Chat(pb.ChatRequest(
                model=model, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
                options=pb.SamplingOptions(max_tokens=24, **options))))

        user = [("user", "Say hello")]
        # tiny:latest's system layer says "You are terse.": a chat without a system message gets it.
        with_system = chat("tiny:q8", [("system", "You are terse."), *user], temperature=0.0)
        assert chat("tiny:latest", user)[-1].usage.prompt_tokens == with_system[-1].usage.prompt_tokens
        assert chat("tiny:q8", user)[-1].usage.prompt_tokens < with_system[-1].usage.prompt_tokens
        # Stop words and temperature from a params layer: written now, seen on the next request's miss.
        text = "".join(c.text for c in with_system)
        stop = text[len(text) // 3:len(text) // 3 + 4]  # four characters from the middle of what it says
        assert len(text) > 12 and stop.strip(), text
        put_model(store, "tiny", "stops", (model_dir / "tiny.gguf").read_bytes(),
                  params={"stop": [stop], "temperature": 0}, system="You are terse.")
        # A scan within the last second is not repeated for a miss: poll the listing, which rescans after it.
        wait_for(lambda: "tiny:stops" in [m.name for m in daemon.stub.ListModels(pb.ListModelsRequest()).models],
                 10, what="the new manifest to be listed")
        stopped = chat("tiny:stops", user)  # no temperature: the params' 0, greedy
        assert "".join(c.text for c in stopped) == text[:text.index(stop)]
        assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP
        own = chat("tiny:stops", user, stop=["zzz-never"])  # the request's own stop words replace the model's
        assert "".join(c.text for c in own) == text
        # Ollama's clients see them as Ollama shows a Modelfile's PARAMETER and SYSTEM.
        shown = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{daemon.http_url}/api/show", data=json.dumps({"model": "tiny:stops"}).encode()), timeout=30).read())
        assert f"stop {json.dumps(stop)}" in shown["parameters"].splitlines()
        assert "temperature 0" in shown["parameters"].splitlines() and shown["system"] == "You are terse."
    finally:
        daemon.stop()
