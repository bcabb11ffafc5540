"""Admission: budgets and max_loaded_models, evicting idle models least recently used first."""

from __future__ import annotations

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.observe.gpu import FedGpu, GpuReading
from supervisor.decide.policies import Resident, Usage, admission
from tests.conftest import in_background, model_table, wait_for
from tests.inprocess import InProcessDaemon

MiB = 1 << 20


def resident(name: str, private_mib: int, last_used: float, pinned: bool = False, idle: bool = True) -> Resident:
    return Resident(name, Usage(private_mib * MiB), last_used, pinned, idle)


def test_evicts_least_recently_used_idle_unpinned_and_only_as_many_as_needed():
    residents = [resident("old", 30, 1.0), resident("pinned", 30, 0.5, pinned=True), resident("busy", 30, 0.1, idle=False),
                 resident("newer", 30, 2.0), resident("newest", 30, 3.0)]
    decision = admission(Usage(50 * MiB), Usage(140 * MiB), 0, residents)
    assert decision.evict == ("old", "newer") and not decision.refused  # 150 held + 50 needed: 60 must go


def test_refuses_without_evicting_when_even_all_candidates_are_not_enough():
    residents = [resident("pinned", 80, 0.0, pinned=True), resident("idle", 10, 1.0)]
    decision = admission(Usage(130 * MiB), Usage(200 * MiB), 0, residents)  # 80 pinned + 130 > 200
    assert decision.evict == () and decision.refused == "memory_budget"


@pytest.mark.parametrize("budget, max_models, expected", [
    (Usage(0, 100 * MiB), 0, "gpu_memory_budget"),
    (Usage(), 1, "max_loaded_models"),
    (Usage(10 * MiB, 10 * MiB), 1, "memory_budget, gpu_memory_budget, max_loaded_models"),
])
def test_names_every_limit_that_stays_broken(budget, max_models, expected):
    residents = [Resident("busy", Usage(20 * MiB, 90 * MiB), 0.0, False, False)]
    assert admission(Usage(20 * MiB, 20 * MiB), budget, max_models, residents).refused == expected


def test_no_limits_no_evictions():
    assert admission(Usage(1 << 40), Usage(), 0, [resident("a", 1 << 20, 0.0)]).evict == ()


def generate(daemon, model: str, max_tokens: int = 2):
    return daemon.stub.Generate(pb.GenerateRequest(model=model, prompt="hi",
                                                   options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0)))


def states(daemon) -> dict[str, pb.WorkerStatus]:
    return {w.model: w for w in daemon.stub.Status(pb.StatusRequest()).workers}


def test_a_load_evicts_the_least_recently_used_idle_model_and_it_comes_back_on_demand(start_daemon):
    # Each tiny worker needs ~36 MiB by its estimate (~40 MiB measured): two fit in 100 MiB, three do not.
    daemon = start_daemon(model_table("pinned", "tiny.gguf", n_ctx=256, pinned=True) + "\n"
                          + model_table("plain", "tiny.gguf", n_ctx=256), extra='memory_budget = "100MiB"')
    before = states(daemon)
    daemon.stub.LoadModel(pb.LoadModelRequest(name="third", path="tiny.gguf", options={"n_ctx": "256"}))
    after = states(daemon)
    assert after["third"].state == "READY"
    assert after["pinned"].pid == before["pinned"].pid  # pinned: never evicted
    assert after["plain"].state == "EXITED" and "evicted to make room for 'third'" in after["plain"].last_exit
    assert '"model_evicted"' in daemon.log()

    assert list(generate(daemon, "plain"))[-1].usage.completion_tokens == 2  # loads again, evicting "third"
    now = states(daemon)
    assert now["plain"].state == "READY" and now["third"].state == "EXITED" and now["pinned"].pid == before["pinned"].pid


def test_what_cannot_fit_is_resource_exhausted_with_the_figures_and_evicts_nothing(start_daemon):
    daemon = start_daemon(model_table("pinned", "tiny.gguf", n_ctx=256, pinned=True) + "\n"
                          + model_table("plain", "tiny.gguf", n_ctx=256), extra='memory_budget = "100MiB"')
    pid = states(daemon)["plain"].pid
    with pytest.raises(grpc.RpcError) as refused:
        daemon.stub.LoadModel(pb.LoadModelRequest(name="huge", path="tiny.gguf", options={"n_ctx": "65536"}))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details()
    assert "model 'huge' does not fit: it needs" in message and "memory_budget is 100.0 MiB" in message
    assert "pinned" in message and "(pinned)" in message and "llmctl estimate" in message
    assert states(daemon)["plain"].pid == pid  # nothing evicted for a load that could not fit anyway
    assert "huge" not in states(daemon)


def test_a_busy_model_is_not_evicted(start_daemon):
    daemon = start_daemon(model_table("busy", "tiny.gguf", n_ctx=256, engine="tests.engines:SlowEngine") + "\n"
                          + model_table("pinned", "tiny.gguf", n_ctx=256, pinned=True), extra='memory_budget = "100MiB"')
    thread, result = in_background(generate(daemon, "busy", max_tokens=100))
    wait_for(lambda: states(daemon)["busy"].state == "BUSY", what="the request to run")
    with pytest.raises(grpc.RpcError) as refused:
        daemon.stub.LoadModel(pb.LoadModelRequest(name="third", path="tiny.gguf", options={"n_ctx": "256"}))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in refused.value.details()
    thread.join(30)
    assert result["chunks"][-1].usage.completion_tokens == 100


def test_max_loaded_models_keeps_one_worker_and_swaps_on_demand(start_daemon):
    daemon = start_daemon(model_table("first", "tiny.gguf", n_ctx=256), extra="max_loaded_models = 1")
    daemon.stub.LoadModel(pb.LoadModelRequest(name="second", path="tiny.gguf", options={"n_ctx": "256"}))
    assert [s.state for s in states(daemon).values()] == ["EXITED", "READY"]
    assert list(generate(daemon, "first"))[-1].usage.completion_tokens == 2
    assert {m: s.state for m, s in states(daemon).items()} == {"first": "READY", "second": "EXITED"}


def test_a_gpu_budget_in_percent_is_of_the_gpus_memory_as_nvml_reports_it(model_dir):
    gpu = FedGpu()
    gpu.gpus = [GpuReading(index=0, temperature_c=40, throttle_reasons=0, memory_used=0, memory_total=1000 * MiB)]
    # Every layer on the GPU: each worker needs ~401 MiB of GPU memory by its estimate (CUDA context included).
    offloaded = model_table("first", "tiny.gguf", n_ctx=256, n_gpu_layers=-1)
    daemon = InProcessDaemon(model_dir, offloaded, gpu=gpu, supervisor='gpu_memory_budget = "50%"')
    try:
        daemon.stub.LoadModel(pb.LoadModelRequest(name="second", path="tiny.gguf",
                                                  options={"n_ctx": "256", "n_gpu_layers": "-1"}))
        assert {m: s.state for m, s in states(daemon).items()} == {"first": "EXITED", "second": "READY"}
        with pytest.raises(grpc.RpcError) as refused:
            daemon.stub.LoadModel(pb.LoadModelRequest(name="big", path="tiny.gguf",
                                                      options={"n_ctx": "65536", "n_gpu_layers": "-1"}))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "gpu_memory_budget is 500.0 MiB" in refused.value.details()
    finally:
        daemon.stop()


class Replica:
    """What admission reads of a replica, and an eviction whose exit the test decides."""

    def __init__(self, model: str, idle: bool, last_used: float) -> None:
        import asyncio
        from types import SimpleNamespace

        self.name = model
        self.label = model
        self.idle = idle
        self.last_used = last_used
        self.holds_memory = True
        self.config = SimpleNamespace(pinned=False, use_mlock=False)
        self.estimate = SimpleNamespace(private_peak=10 * MiB, gpu=0)
        self.exited = asyncio.Event()
        self.evicted = False

    def usage(self) -> Usage:
        return Usage(10 * MiB)

    def evict(self, reason: str):
        import asyncio

        self.evicted, self.idle = True, False  # DRAINING: no longer idle, still holding its memory

        async def retire() -> None:
            await self.exited.wait()
            self.holds_memory = False
        return asyncio.ensure_future(retire())


def test_a_slow_eviction_holds_up_only_the_start_it_makes_room_for(tmp_path):
    """Admission decides one start at a time, but the victims' exits are awaited outside that lock: a
    victim slow to exit must not hold up every other start on the daemon (crash restarts included)."""
    import asyncio
    import os
    from types import SimpleNamespace

    import psutil

    from supervisor.settings.config import Host, parse_config
    from supervisor.errors import ApiError
    from supervisor.observe.events import EventBus
    from supervisor.observe.monitor import Monitor
    from supervisor.catalog.registry import Registry

    host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env={})
    config = parse_config(f'[supervisor]\nstate_dir = "{tmp_path}"\nmax_loaded_models = 2\n', host)

    async def scenario() -> None:
        registry = Registry(config, host, tmp_path, Monitor(FedGpu()), EventBus())
        registry._check_host = lambda *_: None  # the host's RAM and memlock are not what this is about
        idle, busy = Replica("idle", idle=True, last_used=1.0), Replica("busy", idle=False, last_used=2.0)
        newcomer = Replica("newcomer", False, 3.0)  # starting: not idle, and not holding memory yet
        newcomer.holds_memory = False
        registry.models = {r.name: SimpleNamespace(replicas=[r]) for r in (idle, busy, newcomer)}
        restart = Replica("busy", False, 3.0)  # the busy model's crashed replica, starting again
        making_room = asyncio.ensure_future(registry.admit(newcomer))
        await asyncio.sleep(0.1)
        assert idle.evicted and not making_room.done()  # waiting for its victim to exit
        # Meanwhile another start asks: it gets its answer now, not once the victim has gone. (No room:
        # the victim's memory still counts until it exits, and the newcomer's is reserved.)
        try:
            await asyncio.wait_for(registry.admit(restart), timeout=5)
            answer = "admitted"
        except ApiError as e:
            answer = e.code.name
        except asyncio.TimeoutError:
            answer = "still waiting behind the eviction"
        assert answer == "RESOURCE_EXHAUSTED"
        idle.exited.set()
        await asyncio.wait_for(making_room, timeout=5)

    asyncio.run(scenario())


def test_two_replicas_starting_together_cannot_both_take_room_for_one(start_daemon, model_dir):
    """Each start holds its room from admission until its worker counts as held: with room for one
    worker, a model of two replicas loading at once is refused, not admitted twice."""
    import os

    import psutil

    from supervisor.decide.estimate import estimate
    from supervisor.settings.config import Host, model_config
    from supervisor.settings.gguf_file import read_gguf_info

    host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env={})
    config = model_config("tiny", {"path": "tiny.gguf", "n_ctx": "256"}, {}, host)
    peak = estimate(read_gguf_info(model_dir / "tiny.gguf").shape, config).private_peak
    daemon = start_daemon("", extra=f'memory_budget = "{int(peak * 1.5)}"')
    with pytest.raises(grpc.RpcError) as refused:
        daemon.stub.LoadModel(pb.LoadModelRequest(name="tiny", path="tiny.gguf",
                                                  options={"n_ctx": "256", "replicas": "2"}), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory_budget" in refused.value.details()
    assert not [w for w in daemon.stub.Status(pb.StatusRequest()).workers if w.pid]  # the load failed whole
