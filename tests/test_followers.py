"""Followers (WatchEvents, TailModel --follow) are bounded: how many at once, and how far one may fall behind."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

import grpc
import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from supervisor.server import daemon as daemon_module
from supervisor.observe.events import Event, EventBus
from supervisor.observe.fanout import QUEUED
from tests.conftest import model_table, wait_for
from tests.inprocess import InProcessDaemon

T = TypeVar("T")
# Large events fill the transport's buffers (megabytes) sooner, so the queue behind them fills within
# a few thousand events rather than a hundred thousand.
PADDING = "x" * 8192


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(call))
    return refused.value


def test_past_max_followers_a_follower_is_refused_until_one_ends(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=512), extra="max_followers = 2")
    watches = [daemon.stub.WatchEvents(pb.WatchEventsRequest()) for _ in range(2)]
    for watch in watches:
        assert next(watch).kind == "snapshot"  # subscribed

    refused = refusal(daemon.stub.WatchEvents(pb.WatchEventsRequest()))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 streams already follow" in refused.details() and "max_followers = 2" in refused.details()
    # Output followers count too: each holds a queue as an event follower does.
    refused = refusal(daemon.stub.TailModel(pb.TailModelRequest(name="tiny", follow=True)))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_followers = 2" in refused.details()
    list(daemon.stub.TailModel(pb.TailModelRequest(name="tiny")))  # reading what is kept follows nothing

    watches[0].cancel()

    def admitted():
        watch = daemon.stub.WatchEvents(pb.WatchEventsRequest())
        try:
            return next(watch).kind == "snapshot" and watch
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return None

    wait_for(admitted, what="a follower to be taken once one ended").cancel()
    watches[1].cancel()


def test_a_follower_that_falls_behind_is_ended_with_the_count_it_did_not_read(model_dir, monkeypatch):
    buses: list[EventBus] = []

    class NotedBus(EventBus):  # the daemon's own bus, for the test to publish on as the supervisor does
        def __init__(self) -> None:
            super().__init__()
            buses.append(self)

    monkeypatch.setattr(daemon_module, "EventBus", NotedBus)
    daemon = InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512))
    bus = buses[0]

    def on_loop(work: Callable[[], T]) -> T:
        async def call() -> T:
            return work()
        return asyncio.run_coroutine_threadsafe(call(), daemon.loop).result(10)

    try:
        slow = daemon.stub.WatchEvents(pb.WatchEventsRequest(model="tiny"), timeout=120)
        assert next(slow).kind == "snapshot"  # subscribed; from here it reads nothing until the end
        fast = daemon.stub.WatchEvents(pb.WatchEventsRequest(model="tiny"), timeout=120)
        assert next(fast).kind == "snapshot"
        fast_seqs: list[int] = []

        def keep_up() -> None:
            try:
                fast_seqs.extend(int(e.figures["seq"]) for e in fast if e.kind == "flood")
            except grpc.RpcError:
                pass  # cancelled at the end of the test

        reader = threading.Thread(target=keep_up)
        reader.start()
        sent = 0

        def flood() -> bool:
            """A burst of events; True once the slow follower has been ended."""
            nonlocal sent
            first, sent = sent, sent + 200

            def publish() -> int:
                for seq in range(first, sent):
                    bus.followers.publish(Event("flood", "tiny", figures={"seq": seq, "padding": PADDING}))
                return len(bus.followers)

            following = on_loop(publish)
            wait_for(lambda: len(fast_seqs) >= sent, what="the follower that reads to keep up")
            return following < 2

        wait_for(flood, timeout=60, what="the follower that reads nothing to be ended")
        assert on_loop(lambda: len(bus.followers)) == 1  # the one that kept up still follows

        with pytest.raises(grpc.RpcError) as ended:
            received = []
            for event in slow:
                received.append(int(event.figures["seq"]))
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
        assert ended.value.details().startswith(f"fell behind: {QUEUED + 1} events not read")
        # What it did read has no gap; what it did not read is counted, not silently lost.
        assert received == list(range(len(received)))
        assert len(received) + QUEUED + 1 <= sent
        assert fast_seqs == list(range(sent))
        fast.cancel()
        reader.join(10)
    finally:
        daemon.stop()
