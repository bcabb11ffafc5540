"""Replacing a replica's worker: gracefully (it finishes its request while the replacement comes) or
hard (killed now, its request fails with the reason), by the watchdog's decision or by hand; and the
counts status and metrics show.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Callable

from supervisor.decide.policies import Usage
from supervisor.process.states import WorkerState
from supervisor.process.worker_process import WorkerProcess
from supervisor.supervision.states import ReplicaState

if TYPE_CHECKING:
    from supervisor.supervision.replica import Replica


def memory_figures(worker: WorkerProcess) -> dict[str, int]:
    """The worker's latest memory figures, for the record of a decision about it."""
    if not worker.watch.periodic:
        return {}
    latest = worker.watch.periodic[-1]
    figures = {"private_memory_bytes": latest.private, "file_rss_bytes": latest.file_rss}
    if latest.gpu is not None:
        figures["gpu_memory_bytes"] = latest.gpu
    return figures


class Recycles:
    def __init__(self, replica: "Replica", room: Callable[[Usage], tuple[bool, str]],
                 clock: Callable[[], float]) -> None:
        self.replica = replica
        self.count = 0
        self.by_kind: collections.Counter[str] = collections.Counter()  # by rule, for metrics
        self.last_reason = ""
        self.last_at: float | None = None
        self._room = room  # whether the memory budgets hold a replacement beside the workers running now
        self._clock = clock

    def _counted(self, reason: str, kind: str) -> None:
        self.count += 1
        self.by_kind[kind] += 1
        self.last_reason = reason
        self.last_at = self._clock()

    def graceful(self, worker: WorkerProcess, reason: str, figures: dict | None = None,
                 kind: str = "other") -> asyncio.Task:
        """The worker takes no new request and finishes the one it has, while its replacement starts —
        first, when the memory budgets hold both, else once the old one has gone. Requests arriving
        meanwhile wait in the queue for the replacement, so none fails.

        Synchronous up to the DRAINING mark, so two decisions in one tick cannot both start a recycle.
        """
        replica = self.replica
        cost = replica.estimate  # what the replacement may come to hold
        first, why = self._room(Usage(cost.private_peak, cost.gpu))
        replica.events.emit("worker_recycle", replica.name, "info", worker.pid, reason, graceful=True,
                            replacement="first" if first else f"after the old worker exits: {why}",
                            draining_sequences=worker.in_flight,
                            **{**memory_figures(worker), **(figures or {})})
        self._counted(reason, kind)
        replica.change_state(ReplicaState.REPLACING, reason)
        if first:
            # ready_worker() waits on this start, not on the draining worker.
            return replica.retire(worker, reason, replacement=replica.ensure_worker(warm_after=worker))
        retired = replica.retire(worker, reason)
        replica.report(replica.ensure_worker(after_exit=worker))
        return retired

    def hard(self, worker: WorkerProcess, reason: str, grace: float = 0.0, kind: str = "other") -> None:
        """End it now — SIGKILL, or TERM and KILL after `grace`. The request in flight fails with this
        reason; a fresh worker starts (unless it was draining: its replacement is already coming)."""
        if worker.kill_reason or not worker.alive:
            return
        replica = self.replica
        draining = worker.state == WorkerState.DRAINING
        if not draining:  # a draining worker's recycle is already counted
            self._counted(reason, kind)
        replica.events.emit("worker_recycle", replica.name, "warning", worker.pid, reason, graceful=False,
                            failing_sequences=worker.in_flight, **memory_figures(worker))
        worker.kill_reason, worker.kill_kind = reason, kind
        worker.change_state(WorkerState.STOPPING, reason)  # no request goes to it any more
        if not draining and worker is replica.worker and replica.state == ReplicaState.SERVING:
            replica.change_state(ReplicaState.REPLACING, reason)  # its exit starts the replacement
        if grace > 0:
            replica.keep(worker.terminate(grace), f"terminate-{worker.pid}")
        else:
            worker.kill()

    async def by_hand(self, reason: str) -> WorkerProcess:
        """Recycle gracefully by hand; returns the replacement once it serves (the old one retires on)."""
        replica = self.replica
        worker = await replica.ready_worker()
        self.graceful(worker, reason, kind="by_hand")
        return await replica.start()
