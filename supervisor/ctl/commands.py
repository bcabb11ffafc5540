"""What each llmctl command does. Human tables by default, JSON lines with --json."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Iterable

import grpc
from google.protobuf.json_format import MessageToDict

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc


class UsageError(Exception):
    pass


class Output:
    def __init__(self, stream: IO[str], as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json

    def json(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.stream.flush()

    def text(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        for row in [header, *rows]:
            self.stream.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        self.stream.flush()


def as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def until(worker: pb.WorkerStatus) -> str:
    """When keep_alive unloads the idle worker, as `ollama ps` shows it."""
    if not worker.pid:
        return "-"
    return "forever" if worker.unload_in_s < 0 else f"in {human_duration(worker.unload_in_s)}"


def sampling(args: argparse.Namespace) -> pb.SamplingOptions:
    options = pb.SamplingOptions(max_tokens=max(args.max_tokens, 0), stop=args.stop)
    if args.max_tokens < 0:
        raise UsageError("--max-tokens must be 0 or more")
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    return options


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def stream(chunks: Iterable[pb.GenerateChunk], out: Output) -> str:
    """Print a stream as it arrives; return the whole text. The last JSON object carries usage."""
    text = []
    for chunk in chunks:
        text.append(chunk.text)
        if out.as_json:
            obj = {"text": chunk.text, "tokens": chunk.tokens}
            if chunk.finish_reason:
                obj.update(finish_reason=pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower(),
                           usage=as_dict(chunk.usage), timings=as_dict(chunk.timings), model=chunk.model,
                           worker_pid=chunk.worker_pid)
            out.json(obj)
        else:
            out.text(chunk.text)
    if not out.as_json:
        out.text("\n")
    return "".join(text)


def run(args: argparse.Namespace, channel: grpc.Channel, out: Output) -> int:
    stub = supervisor_pb2_grpc.SupervisorStub(channel)
    handler = globals()[f"cmd_{args.command}"]
    return handler(args, stub, out) or 0


def cmd_status(args, stub, out: Output) -> int:
    status = stub.Status(pb.StatusRequest())
    if out.as_json:
        for worker in status.workers:
            out.json(as_dict(worker))
        return 0
    rows = [[w.model, w.state, str(w.pid or "-"), human_bytes(w.private_memory_bytes), human_bytes(w.file_rss_bytes),
             human_bytes(w.gpu_memory_bytes) if w.gpu_memory_bytes else "-",
             f"{w.cpu_percent:.0f}%" if w.pid else "-", f"{w.gpu_temperature_c:.0f}°C" if w.gpu_temperature_c else "-",
             str(w.requests_served), str(w.queue_depth), str(w.restarts), str(w.recycles),
             human_duration(w.uptime_s) if w.pid else "-", until(w),
             w.throttle_reason or w.last_exit or w.last_recycle_reason] for w in status.workers]
    out.table(["MODEL", "STATE", "PID", "PRIVATE", "FILE", "GPU", "CPU", "TEMP", "REQUESTS", "QUEUE", "RESTARTS",
               "RECYCLES", "UPTIME", "UNTIL", "THROTTLED / LAST EXIT / RECYCLE"], rows)
    host = [f"GPU {g.index}: {g.temperature_c:.0f}°C, {human_bytes(g.memory_used_bytes)} of "
            f"{human_bytes(g.memory_total_bytes)}" for g in status.gpus]
    if status.HasField("cpu_temperature_c"):
        host.append(f"CPU: {status.cpu_temperature_c:.0f}°C")
    if status.standby_pids:
        host.append("standby: pid " + ", ".join(str(p) for p in status.standby_pids))
    for line in host:
        out.text(line + "\n")
    return 0


def cmd_models(args, stub, out: Output) -> int:
    models = stub.ListModels(pb.ListModelsRequest()).models
    if out.as_json:
        for m in models:
            out.json(as_dict(m))
        return 0
    rows = [[m.name, m.state, m.architecture, human_bytes(m.file_size_bytes), str(m.n_ctx), str(m.n_gpu_layers),
             "yes" if m.use_mmap else "no", m.source, m.path] for m in models]
    out.table(["NAME", "STATE", "ARCH", "SIZE", "N_CTX", "GPU LAYERS", "MMAP", "SOURCE", "PATH"], rows)
    return 0


def cmd_load(args, stub, out: Output) -> int:
    reply = stub.LoadModel(pb.LoadModelRequest(name=args.name, path=args.path, options=parse_options(args.option)))
    if out.as_json:
        out.json(as_dict(reply.model))
    else:
        out.text(f"{reply.model.name}: loaded from {reply.model.path} ({reply.model.state})\n")
    return 0


def cmd_unload(args, stub, out: Output) -> int:
    stub.UnloadModel(pb.UnloadModelRequest(name=args.name))
    if out.as_json:
        out.json({"name": args.name, "unloaded": True})
    else:
        out.text(f"{args.name}: unloaded\n")
    return 0


def cmd_generate(args, stub, out: Output) -> int:
    call = stub.Generate(pb.GenerateRequest(model=args.model, prompt=args.prompt, options=sampling(args),
                                            keep_alive=args.keep_alive))
    try:
        stream(call, out)
    except KeyboardInterrupt:
        call.cancel()  # the worker stops at the next token
        raise
    return 0


def cmd_chat(args, stub, out: Output) -> int:
    history: list[pb.ChatMessage] = []
    if args.system:
        history.append(pb.ChatMessage(role="system", content=args.system))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write(">>> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit", "/bye"):
            return 0
        if not line.strip():
            continue
        history.append(pb.ChatMessage(role="user", content=line.rstrip("\n")))
        call = stub.Chat(pb.ChatRequest(model=args.model, messages=history, options=sampling(args),
                                        keep_alive=args.keep_alive))
        try:
            reply = stream(call, out)
        except KeyboardInterrupt:
            call.cancel()
            history.pop()
            sys.stderr.write("\n(cancelled)\n")
            continue
        history.append(pb.ChatMessage(role="assistant", content=reply))


def cmd_tokenize(args, stub, out: Output) -> int:
    reply = stub.Tokenize(pb.TokenizeRequest(model=args.model, text=args.text, add_special=not args.no_special))
    if out.as_json:
        out.json(as_dict(reply))
    else:
        out.text(f"{reply.count} tokens (context {reply.n_ctx}): {' '.join(map(str, reply.tokens))}\n")
    return 0


def _recycle(args, stub, out: Output, hard: bool) -> int:
    reply = stub.RecycleModel(pb.RecycleModelRequest(name=args.model, hard=hard))
    if out.as_json:
        out.json({"model": args.model, "old_pid": reply.old_pid, "new_pid": reply.new_pid})
    else:
        out.text(f"{args.model}: worker {reply.old_pid} replaced by {reply.new_pid}\n")
    return 0


def cmd_recycle(args, stub, out: Output) -> int:
    return _recycle(args, stub, out, hard=False)


def cmd_restart(args, stub, out: Output) -> int:
    return _recycle(args, stub, out, hard=True)


def cmd_events(args, stub, out: Output) -> int:
    """Follows until interrupted; one line (or JSON object) per event."""
    import datetime

    for event in stub.WatchEvents(pb.WatchEventsRequest(model=args.model)):
        if out.as_json:
            out.json(as_dict(event))
            continue
        when = datetime.datetime.fromtimestamp(event.time_unix).strftime("%H:%M:%S")
        figures = " ".join(f"{k}={v}" for k, v in sorted(event.figures.items()))
        out.text(f"{when} {event.model} {event.kind} pid={event.worker_pid} {event.state} {event.reason} {figures}".rstrip() + "\n")
    return 0
