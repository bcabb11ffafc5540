"""A replica's states, apart from its worker process's (supervisor/process/states.py), as supervisord
keeps its supervisor states apart from its process states. Every change goes through
`Replica.change_state`, checked against this table, with an event."""

from __future__ import annotations

import enum


class ReplicaState(enum.Enum):
    UNLOADED = "UNLOADED"    # no worker; one starts on the next request (after keep_alive, an eviction, a hot GPU)
    STARTING = "STARTING"    # its worker is being admitted, loaded and warmed up
    BACKOFF = "BACKOFF"      # its worker crashed; the restart waits out the back-off
    SERVING = "SERVING"      # a worker takes requests
    REPLACING = "REPLACING"  # a recycle: the old worker finishes its request while the replacement comes
    STOPPED = "STOPPED"      # stopped by hand (llmctl stop): nothing starts until llmctl start
    FATAL = "FATAL"          # gave up, with the reason: llmctl start or a reload tries again
    CLOSED = "CLOSED"        # unloaded or shut down, for good


S = ReplicaState
ALLOWED = {
    S.UNLOADED: {S.STARTING, S.STOPPED, S.CLOSED},
    S.STARTING: {S.SERVING, S.UNLOADED, S.FATAL, S.STOPPED, S.CLOSED},
    S.BACKOFF: {S.STARTING, S.STOPPED, S.CLOSED},
    S.SERVING: {S.REPLACING, S.UNLOADED, S.BACKOFF, S.STARTING, S.FATAL, S.STOPPED, S.CLOSED},
    # BACKOFF, STARTING: the worker being replaced died instead (killed by a line it crossed as it started).
    S.REPLACING: {S.SERVING, S.UNLOADED, S.BACKOFF, S.STARTING, S.FATAL, S.STOPPED, S.CLOSED},
    S.STOPPED: {S.STARTING, S.CLOSED},
    S.FATAL: {S.STARTING, S.STOPPED, S.CLOSED},
    S.CLOSED: set(),
}
# States in which the replica should have a worker: the reconciler starts one when none serves or comes.
WANTS_WORKER = frozenset({S.STARTING, S.BACKOFF, S.SERVING, S.REPLACING})
# States in which no worker may start, and requests are refused with the reason.
REFUSING = frozenset({S.STOPPED, S.FATAL, S.CLOSED})
