"""Config reload: the pure plan, and `llmctl reread` / `update` / SIGHUP against a real daemon."""

from __future__ import annotations

import dataclasses
import signal

import psutil

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.settings.config import Host, parse_config
from supervisor.catalog.reload_plan import keep_bound, plan
from tests.conftest import in_background, loaded_models, model_table, wait_for
from tests.test_llmctl import llmctl
from tests.test_notify import NotifySocket

HOST = Host(memory_bytes=64 << 30, is_root=False, env={})
SLOW = "tests.engines:SlowEngine"


def config(text: str):
    return parse_config('[supervisor]\naddress = "unix:///tmp/x.sock"\nstate_dir = "/tmp/s"\nmodel_dirs = ["/m"]\n'
                        + text, HOST)


def running(cfg, api: tuple[str, ...] = ()):
    models = {m.name: (m, "config") for m in cfg.models}
    models.update({name: (dataclasses.replace(cfg.models[0], name=name), "api") for name in api})
    return models


def test_plan_adds_removes_and_says_which_changes_need_a_new_worker():
    old = config(model_table("same", "a.gguf") + "\n" + model_table("gone", "a.gguf") + "\n"
                 + model_table("ctx", "a.gguf", n_ctx=512) + "\n" + model_table("tuned", "a.gguf", max_requests=0))
    new = config(model_table("same", "a.gguf") + "\n"
                 + model_table("ctx", "a.gguf", n_ctx=1024) + "\n" + model_table("tuned", "a.gguf", max_requests=50)
                 + "\n" + model_table("new", "b.gguf") + "\n" + model_table("mine", "a.gguf"))
    result = plan(running(old, api=("mine", "theirs")), old, new)
    assert [m.name for m in result.added] == ["new"]
    assert result.removed == ("gone",)  # "theirs" was loaded through the API: a reload leaves it alone
    changes = {c.config.name: c for c in result.changed}
    assert set(changes) == {"ctx", "tuned", "mine"}
    assert changes["ctx"].keys == ("n_ctx",) and changes["ctx"].new_worker
    assert changes["tuned"].keys == ("max_requests",) and not changes["tuned"].new_worker
    assert changes["mine"].keys[0] == "source"  # the file takes over the API's model of that name
    assert result.live_keys == () and result.restart_keys == ()


def test_plan_of_supervisor_settings_live_or_at_restart():
    old = config('poll_interval = "1s"\nstandby_workers = 1\n')
    new = config('poll_interval = "2s"\nstandby_workers = 2\nmemory_budget = "8GiB"\n')
    result = plan({}, old, new)
    assert set(result.live_keys) == {"poll_interval", "memory_budget"}
    assert result.restart_keys == ("standby_workers",)
    kept = keep_bound(old, new)
    assert kept.standby_workers == 1 and kept.poll_interval == 2.0
    assert plan({}, old, old).empty


def stream(daemon, model: str, max_tokens: int):
    return daemon.stub.Generate(pb.GenerateRequest(model=model, prompt="hello",
                                                   options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0)))


def test_sighup_applies_added_removed_and_changed_models_without_failing_a_request(start_daemon):
    notify = NotifySocket()
    first = "\n".join([model_table("keep", "tiny.gguf", n_ctx=256),
                       model_table("gone", "tiny.gguf", n_ctx=256, engine=SLOW),
                       model_table("resized", "tiny.gguf", n_ctx=256, engine=SLOW),
                       model_table("tuned", "tiny.gguf", n_ctx=256)])
    daemon = start_daemon(first, env=notify.env(watchdog_s=30))
    daemon.stub.LoadModel(pb.LoadModelRequest(name="extra", path="tiny.gguf", options={"n_ctx": "256"}))
    pids = {w.model: w.pid for w in daemon.stub.Status(pb.StatusRequest()).workers}
    config_path = daemon.base / "config.toml"
    header = config_path.read_text().split("[models.")[0]
    config_path.write_text(header + "\n".join([
        model_table("keep", "tiny.gguf", n_ctx=256),
        model_table("resized", "tiny.gguf", n_ctx=512, engine=SLOW),
        model_table("tuned", "tiny.gguf", n_ctx=256, max_requests=100),
        model_table("fresh", "tiny.gguf", n_ctx=256)]))

    shown = llmctl(daemon, "reread")
    assert shown.returncode == 0, shown.stderr
    assert "fresh: added — would load" in shown.stdout
    assert "gone: removed — would drain and unload" in shown.stdout
    assert "resized: changed (n_batch, n_ctx) — would apply, worker recycled" in shown.stdout
    assert "tuned: changed (max_requests) — would apply, running worker kept" in shown.stdout
    assert "keep" not in shown.stdout and "extra" not in shown.stdout
    assert {m.name for m in loaded_models(daemon)} == set(pids)  # nothing applied

    # A request in flight on each of the removed and the recycled model: both must finish whole.
    on_gone, gone_result = in_background(stream(daemon, "gone", 60))
    on_resized, resized_result = in_background(stream(daemon, "resized", 60))
    wait_for(lambda: {daemon.worker("gone").state, daemon.worker("resized").state} == {"BUSY"},
             what="both requests to be generating")
    notify.drain()
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.until("RELOADING=1")[-1]
    assert "MONOTONIC_USEC=" in reloading
    assert "READY=1" in notify.until("READY=1")[-1]  # sent once the update is done

    on_gone.join(30)
    on_resized.join(30)
    for result in (gone_result, resized_result):
        assert "error" not in result, result.get("error")
        assert result["chunks"][-1].usage.completion_tokens == 60
    models = {m.name: m for m in loaded_models(daemon)}
    assert set(models) == {"keep", "resized", "tuned", "fresh", "extra"}
    assert models["fresh"].state == "READY" and models["fresh"].source == "config"
    assert models["resized"].n_ctx == 512
    now = {w.model: w for w in daemon.stub.Status(pb.StatusRequest()).workers}
    assert now["resized"].pid != pids["resized"] and "config changed: n_batch, n_ctx" in now["resized"].last_recycle_reason
    assert [now[m].pid for m in ("keep", "tuned", "extra")] == [pids[m] for m in ("keep", "tuned", "extra")]
    assert not psutil.pid_exists(pids["gone"]) or psutil.Process(pids["gone"]).status() == psutil.STATUS_ZOMBIE
    assert list(stream(daemon, "resized", 3))[-1].usage.completion_tokens == 3

    again = llmctl(daemon, "update")
    assert again.returncode == 0 and again.stdout.startswith("no changes in ")


def test_a_broken_config_changes_nothing_and_says_why(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256))
    config_path = daemon.base / "config.toml"
    good = config_path.read_text()
    config_path.write_text(good + '\n[models.bad]\npath = "tiny.gguf"\nn_ctx = "lots"\n')
    refused = llmctl(daemon, "update")
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION" in refused.stderr and "n_ctx" in refused.stderr and "nothing was changed" in refused.stderr
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"reload_refused"' in daemon.log(), what="the refused reload in the log")
    assert [m.name for m in loaded_models(daemon)] == ["tiny"]
    assert list(stream(daemon, "tiny", 2))[-1].usage.completion_tokens == 2

    # A model that fails to load is reported as failed; the rest of the update still applies.
    config_path.write_text(good + "\n" + model_table("missing", "nope.gguf") + "\n" + model_table("ok", "tiny.gguf", n_ctx=256))
    applied = llmctl(daemon, "--json", "update")
    assert applied.returncode == 1
    assert '"name": "missing"' in applied.stdout and "no model file 'nope.gguf'" in applied.stdout
    assert daemon.worker("ok").state == "READY"


def test_live_settings_apply_and_bound_ones_are_reported(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256))
    config_path = daemon.base / "config.toml"
    config_path.write_text(config_path.read_text().replace(
        "[supervisor]\n", '[supervisor]\npoll_interval = "250ms"\nstandby_workers = 0\n'))
    result = llmctl(daemon, "update")
    assert result.returncode == 0, result.stderr
    assert "settings applied: poll_interval" in result.stdout
    assert "need a restart of llm-supervisord: standby_workers" in result.stdout
    assert '"restart_needed"' in daemon.log()
    # The running value stays: the spare process is still kept ready.
    wait_for(lambda: daemon.stub.Status(pb.StatusRequest()).standby_pids, what="the standby process")
