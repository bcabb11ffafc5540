"""Worker states, as supervisord names its process states, and the groups policies ask about."""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    STARTING = "STARTING"   # spawned, loading the model
    READY = "READY"         # idle, takes requests
    BUSY = "BUSY"           # generating
    DRAINING = "DRAINING"   # finishes its request, takes no new one
    STOPPING = "STOPPING"   # TERM sent, waiting for the exit
    EXITED = "EXITED"       # gone; the model may start another
    BACKOFF = "BACKOFF"     # waiting before a restart after a crash
    FATAL = "FATAL"         # gave up: the reason says why; loading the model again retries
    # The model's, never a worker's: stopped by hand (llmctl stop), it starts again only with llmctl start.
    STOPPED = "STOPPED"


SERVING_STATES = frozenset({WorkerState.READY, WorkerState.BUSY})
ALIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY, WorkerState.DRAINING, WorkerState.STOPPING})

# Which transitions make sense; anything else is a bug worth failing loudly on in tests.
ALLOWED = {
    WorkerState.STARTING: {WorkerState.READY, WorkerState.STOPPING, WorkerState.EXITED, WorkerState.FATAL},
    WorkerState.READY: {WorkerState.BUSY, WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED},
    WorkerState.BUSY: {WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED},
    WorkerState.DRAINING: {WorkerState.STOPPING, WorkerState.EXITED},
    WorkerState.STOPPING: {WorkerState.EXITED},
    WorkerState.EXITED: {WorkerState.STARTING, WorkerState.BACKOFF, WorkerState.FATAL},
    WorkerState.BACKOFF: {WorkerState.STARTING, WorkerState.FATAL},
    WorkerState.FATAL: {WorkerState.STARTING},
    WorkerState.STOPPED: set(),
}


# Deaths a restart cannot cure, and what to do instead: three blind restarts would only hide the cause.
HOPELESS_SIGNALS = {
    "SIGILL": "the llama.cpp build executes an instruction this CPU cannot run; restarting cannot help. "
              "Run `llm-supervisord --check-build`, rebuild llama.cpp for this CPU (`LLAMA_CPU=x86-64-v2 bash "
              "deploy/setup.sh`, README: 'CPU support'), then `llmctl start {model}`",
    "SIGBUS": "the model file changed or shrank under the worker (a read of its mmap'd weights failed: the file "
              "was truncated, overwritten in place, or its disk failed). Check it with `llmctl estimate`; replace "
              "a model file by copying it under a new name and renaming it over the old one; then "
              "`llmctl start {model}`",
}


def hopeless(returncode: int | None, model: str) -> str:
    """Why a worker's death by this signal will repeat on every restart, and what to do; '' otherwise."""
    import signal

    if returncode is None or returncode >= 0:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return ""
    advice = HOPELESS_SIGNALS.get(name, "")
    return advice.format(model=model)


def describe_exit(returncode: int) -> str:
    """'exited with status 3' / 'killed by signal SIGKILL (9)' — what an operator wants to read."""
    import signal

    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " — the kernel's OOM killer sends this too" if -returncode == signal.SIGKILL else ""
        return f"killed by signal {name} ({-returncode}){hint}"
    return f"exited with status {returncode}"
