"""The watchdog's pass over one replica: measure its workers, ask the policies, carry out the answer.

Each poll interval (`tick`) and after each request (`after_request`). The policies decide
(supervisor/decide/policies.py, pure); this only acts on their decision, one per worker per pass, and
checks what the policies cannot see from samples: a busy worker's progress, keep_alive, the GPUs' heat.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from worker.heartbeat import read_beat

from supervisor.decide.policies import Action, Decision, Heat, Thermal, decide, hung_for, keep_alive_expired
from supervisor.observe.gpu import GpuSnapshot
from supervisor.process.states import SERVING_STATES, WorkerState
from supervisor.process.worker_process import WorkerProcess

if TYPE_CHECKING:
    from supervisor.supervision.replica import Replica

# Between SIGTERM and SIGKILL for a worker that is hung or past its request_timeout.
KILL_GRACE_S = 2.0
WATCHED = SERVING_STATES | {WorkerState.DRAINING}


class Watchdog:
    def __init__(self, replica: "Replica", clock: Callable[[], float]) -> None:
        self.replica = replica
        self._clock = clock

    def tick(self, gpus: GpuSnapshot | None) -> None:
        """Each poll interval. A draining worker is still watched: its last request must not cross the
        hard line either."""
        replica = self.replica
        replica.reconcile()
        if gpus is not None:
            self._check_heat(gpus)
        for worker in dict.fromkeys([replica.worker, *replica.retiring]):  # a draining worker is both: once
            if worker is None or worker.state not in WATCHED:
                continue
            sample = replica.sample(worker, gpus)
            if sample is not None:
                worker.watch.periodic.append(sample)
                baseline = worker.watch.baseline
                if baseline is not None and baseline.gpu is None and sample.gpu is not None:
                    # NVML lists a process a poll after it allocates: its first GPU figure is its baseline.
                    worker.watch.baseline = dataclasses.replace(baseline, gpu=sample.gpu)
                self._act(worker, self._decide(worker))
            self._check_progress(worker)
        self.unload_if_idle()

    def after_request(self, worker: WorkerProcess) -> Decision:
        """After each request: a per-request sample, so a leak shows as a trend per request."""
        replica = self.replica
        replica.used()
        sample = replica.sample(worker)
        if sample is None:
            return Decision(Action.NONE)
        worker.watch.per_request.append(sample)
        worker.watch.periodic.append(sample)
        return self._act(worker, self._decide(worker))

    @staticmethod
    def _decide(worker: WorkerProcess) -> Decision:
        watch = worker.watch
        return decide(watch.periodic, watch.per_request, watch.baseline, worker.limits)

    def _act(self, worker: WorkerProcess, decision: Decision) -> Decision:
        recycles = self.replica.recycles
        if decision.action == Action.KILL:
            recycles.hard(worker, decision.reason, kind=decision.rule)
        elif decision.action == Action.RECYCLE and worker.state in SERVING_STATES:
            recycles.graceful(worker, decision.reason, decision.figures, kind=decision.rule)
        return decision

    def _check_progress(self, worker: WorkerProcess) -> None:
        """A busy worker must prove progress: a hung C call keeps the process and its threads alive."""
        if worker.idle.is_set() or not worker.alive or worker.kill_reason:
            return
        timeout = self.replica.config.heartbeat_timeout
        silent = hung_for(read_beat(str(worker.heartbeat_path)), worker.busy_since, self._clock(), timeout)
        if silent is not None:
            self.replica.recycles.hard(worker, f"no progress for {silent:.1f} s (heartbeat_timeout {timeout:g} s): hung",
                                       grace=KILL_GRACE_S, kind="hung")

    def unload_if_idle(self) -> None:
        """keep_alive: never while a request runs or waits; counted from the end of the last one."""
        replica = self.replica
        worker = replica.worker
        if worker is None or worker.state not in SERVING_STATES:
            return
        if keep_alive_expired(replica.last_used, self._clock(), replica.keep_alive, replica.queue.load):
            reason = f"idle for keep_alive ({replica.keep_alive:g} s)"
            replica.events.emit("worker_idle_unload", replica.name, "info", worker.pid, reason)
            replica.unload(reason)

    def _check_heat(self, gpus: GpuSnapshot) -> None:
        """temperature_throttle closes the door to new requests and worker starts; temperature_critical
        also drains and unloads the worker. Both hold until the GPU is `temperature_hysteresis` below."""
        replica = self.replica
        worker = replica.worker
        pid = worker.pid if worker is not None else 0
        c = replica.config
        rose, cooled = replica.thermal.update(
            gpus, gpus.devices_of(worker.pid) if worker is not None and worker.alive else set(),
            Thermal(c.temperature_throttle, c.temperature_critical, c.temperature_hysteresis))
        for hot in rose:
            critical = hot.level == Heat.CRITICAL
            replica.events.emit("gpu_critical" if critical else "gpu_throttle", replica.name,
                                "error" if critical else "warning", pid, hot.reason, gpu=hot.gpu,
                                temperature_c=hot.temperature)
            if critical:
                replica.unload(hot.reason)
        if cooled:
            replica.events.emit("gpu_cool", replica.name, "info", pid, cooled)
        if rose or cooled:
            replica.notify()
