"""Entry point of a worker process: `python -m worker.main …`, started only by the supervisor.

Order matters: ptrace-class access is forbidden first (a spare becomes any model's worker, and holds
its prompts then), the parent-death signal next, and no_new_privs and rlimits before the model is
loaded, so nothing the model loads runs unlimited or can outlive the supervisor.

`python -m worker.main --standby --parent-pid PID` is a spare: it imports the runtime (grpc,
llama_cpp: ~0.2 s idle, much more on busy cores) ahead of need, then waits for one JSON line on stdin —
the argument list a fresh worker would have had — and becomes that worker. EOF on stdin ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from .limits import Limits, apply_limits, forbid_connect, forbid_ptrace, tie_to_parent

EXIT_LOAD_FAILED = 3
# Printed on stdout once the socket listens, so the supervisor connects once, at the right moment,
# instead of polling a socket that does not exist yet (gRPC's reconnect back-off cost ~75 ms a start).
LISTENING = "llm-supervisor-worker: listening"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-supervisor-worker")
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--options", required=True, help="JSON: llama.cpp load options")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--rlimit-data", type=int, default=0, help="bytes; 0 = unlimited")
    p.add_argument("--rlimit-nofile", type=int, default=1024)
    p.add_argument("--heartbeat", help="file to stamp per token and prompt batch, read by the supervisor")
    p.add_argument("--stream-interval", type=float, default=0.0, help="seconds between stream messages, at most")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    forbid_ptrace()  # here, for fresh workers and spares alike: no other worker may read our memory or fds
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--standby"]:
        return standby(argv[1:])
    args = parse_args(argv)
    tie_to_parent(args.parent_pid)
    return serve(args)


def standby(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llm-supervisor-worker --standby")
    p.add_argument("--parent-pid", type=int, required=True)
    tie_to_parent(p.parse_args(argv).parent_pid)
    import grpc  # noqa: F401  the imports a worker needs, done while nobody waits for them
    import llama_cpp  # noqa: F401

    from llm_supervisor.v1 import worker_pb2_grpc  # noqa: F401

    from . import embedding, embedding_service, engine, heartbeat, service  # noqa: F401

    line = sys.stdin.readline()
    if not line.strip():  # the supervisor no longer needs a spare
        return 0
    args = parse_args(json.loads(line))
    return serve(args)


def generation_service(args: argparse.Namespace, options: dict, beat):
    from .engine import load_engine_class
    from .service import WorkerService

    engine = load_engine_class(args.engine)()
    info = engine.load(args.model, options)
    return engine, info, WorkerService(args.name, engine, info, args.stream_interval, beat)


def embedding_service(args: argparse.Namespace, options: dict, beat):
    """`embedding = true`: llama.cpp in embedding mode, instead of the generation engine's batch loop."""
    from .embedding import embedder_class
    from .embedding_service import EmbeddingService

    engine = embedder_class(args.engine)()
    info = engine.load(args.model, options)
    return engine, info, EmbeddingService(args.name, engine, info, beat)


def serve(args: argparse.Namespace) -> int:
    apply_limits(Limits(data_bytes=args.rlimit_data or None, nofile=args.rlimit_nofile))
    try:
        import grpc  # after the limits in a fresh worker: its threads and allocations are bounded too

        from llm_supervisor.v1 import worker_pb2_grpc

        from .heartbeat import Heartbeat

        options = json.loads(args.options)
        beat = Heartbeat(args.heartbeat).beat if args.heartbeat else (lambda pool=None: None)
        start = embedding_service if options.get("embedding") else generation_service
        engine, info, service = start(args, options, beat)
        # No warm-up here: the supervisor asks for it (WarmUp) when it will not compete for the cores.
    except MemoryError:
        limit = f" (rlimit_data = {args.rlimit_data} bytes)" if args.rlimit_data else ""
        print(f"error: out of memory while loading {args.model}{limit}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    except Exception as e:  # the supervisor shows this line to whoever asked for the load
        print(f"error: cannot load {args.model}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in the supervisor's terminal is the supervisor's to handle

    # A thread per stream in flight (up to `parallel` of them), and room for Info, Tokenize and WarmUp.
    server = grpc.server(ThreadPoolExecutor(max_workers=info.parallel + 4))
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    os.umask(0o077)  # the socket is the supervisor's alone
    server.add_insecure_port(f"unix://{args.socket}")
    server.start()
    forbid_connect()
    print(LISTENING, flush=True)
    stop.wait()
    server.stop(grace=10).wait()
    service.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
