"""The replica's own states: one table of transitions, checked on every change, and the reconciler that
gives a replica the worker it should have when no edge did."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from supervisor.observe.events import EventBus
from supervisor.observe.gpu import FedGpu
from supervisor.observe.monitor import Monitor
from supervisor.settings.config import Host, model_config
from supervisor.settings.gguf_file import read_gguf_info
from supervisor.supervision.replica import Replica
from supervisor.supervision.states import ALLOWED, REFUSING, WANTS_WORKER, ReplicaState

S = ReplicaState


def test_every_state_has_a_row_and_closed_is_the_end():
    assert set(ALLOWED) == set(ReplicaState)
    assert ALLOWED[S.CLOSED] == set()
    assert all(S.CLOSED in targets for state, targets in ALLOWED.items() if state != S.CLOSED)  # unload from anywhere
    assert not WANTS_WORKER & REFUSING


@pytest.mark.parametrize("path", [
    (S.STARTING, S.SERVING),                                   # a load
    (S.STARTING, S.SERVING, S.REPLACING, S.SERVING),           # a recycle
    (S.STARTING, S.SERVING, S.BACKOFF, S.STARTING, S.SERVING),  # a crash, backed off
    (S.STARTING, S.SERVING, S.UNLOADED, S.STARTING),           # keep_alive, then a request
    (S.STARTING, S.FATAL, S.STARTING, S.SERVING),              # llmctl start after a failed load
    (S.STARTING, S.SERVING, S.STOPPED, S.STARTING),            # llmctl stop, llmctl start
])
def test_the_lifecycles_operators_see_are_allowed(path):
    state = S.UNLOADED
    for new in path:
        assert new in ALLOWED[state], (state, new)
        state = new


@pytest.fixture
def replica(model_dir):
    host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env={})
    config = model_config("tiny", {"path": "tiny.gguf"}, {}, host)
    return Replica(config, read_gguf_info(model_dir / "tiny.gguf"), model_dir, Monitor(FedGpu()), EventBus())


def test_a_change_the_table_does_not_allow_fails_loudly(replica):
    with pytest.raises(RuntimeError, match="UNLOADED → SERVING is not allowed"):
        replica.change_state(S.SERVING)
    assert replica.state == S.UNLOADED


@pytest.mark.parametrize("state, starts", [
    (S.SERVING, True),     # should have a worker, has none, none coming: the net catches it
    (S.BACKOFF, True),
    (S.UNLOADED, False),   # waits for a request
    (S.STOPPED, False),
    (S.FATAL, False),
])
def test_the_reconciler_starts_a_worker_only_where_one_is_wanted_and_missing(replica, monkeypatch, state, starts):
    started = []
    monkeypatch.setattr(replica, "ensure_worker", lambda **kw: started.append(kw) or asyncio.Future())
    replica.state = state  # as if the edges had left it there with no worker and no start

    async def tick():
        replica.reconcile()
        await asyncio.sleep(0)

    asyncio.run(tick())
    assert bool(started) == starts


def test_the_reconciler_leaves_a_worker_being_killed_to_its_exit(replica, monkeypatch):
    """A worker still alive after a hard kill (TERM, then KILL after a grace) still holds its memory: its
    exit starts the replacement, never the reconciler beside it."""
    from types import SimpleNamespace

    started = []
    monkeypatch.setattr(replica, "ensure_worker", lambda **kw: started.append(kw) or asyncio.Future())
    replica.state = S.REPLACING
    replica.worker = SimpleNamespace(alive=True, state=None)

    async def tick():
        replica.reconcile()

    asyncio.run(tick())
    assert started == []

