"""What each llmctl command does. Human tables by default, JSON lines with --json."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Iterable

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

    def result(self, obj: dict, text: str) -> None:
        """A command's one answer: `obj` as JSON with --json, else `text` for people."""
        if self.as_json:
            self.json(obj)
        else:
            self.text(text)

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


def label(worker: pb.WorkerStatus, workers) -> str:
    """The model's name, with the replica's number where the model has several: "qwen#2"."""
    several = sum(w.model == worker.model for w in workers) > 1
    return f"{worker.model}#{worker.replica + 1}" if several else worker.model


def sampling(args: argparse.Namespace) -> pb.SamplingOptions:
    options = pb.SamplingOptions(max_tokens=max(args.max_tokens, 0), stop=args.stop)
    if args.max_tokens < 0:
        raise UsageError("--max-tokens must be 0 or more")
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    for name in ("grammar", "json_schema"):
        path = getattr(args, name)
        if path is not None:
            try:
                setattr(options, name, path.read_text())
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--{name.replace('_', '-')}: cannot read {path}: {e}") from None
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


class Stubs(supervisor_pb2_grpc.SupervisorStub):
    """The Supervisor service's stub, with the standard health service's beside it."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


class CommandError(grpc.RpcError):
    """A failure llmctl finds itself, reported like the server's own."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def cancel_on_interrupt(call):
    """A server stream's items; ^C cancels the call (the server stops its work) before it propagates."""
    try:
        yield from call
    except KeyboardInterrupt:
        call.cancel()
        raise


def run(args: argparse.Namespace, channel: grpc.Channel, out: Output) -> int:
    stub = Stubs(channel)
    handler = globals()[f"cmd_{args.command}"]
    return handler(args, stub, out) or 0


def pool_columns(w: pb.WorkerStatus) -> list[str]:
    """SEQS active/parallel, KV cells used/n_ctx, cached sequences, preemptions; "-" before a worker serves."""
    p = w.pool
    if not p.parallel:
        return ["-"] * 4
    return [f"{p.sequences_active}/{p.parallel}", f"{p.cells_used}/{p.n_ctx}", str(p.sequences_cached), str(p.preemptions)]


def cmd_status(args, stub, out: Output) -> int:
    status = stub.Status(pb.StatusRequest())
    workers = [w for w in status.workers if not args.model or w.model == args.model]
    if args.model and not workers:
        raise CommandError(grpc.StatusCode.NOT_FOUND, f"unknown model {args.model!r}")
    if out.as_json:
        for worker in workers:
            out.json(as_dict(worker))
        return 0
    rows = [[label(w, workers), w.state, str(w.pid or "-"), human_bytes(w.private_memory_bytes), human_bytes(w.file_rss_bytes),
             human_bytes(w.gpu_memory_bytes) if w.gpu_memory_bytes else "-",
             f"{w.cpu_percent:.0f}%" if w.pid else "-", f"{w.gpu_temperature_c:.0f}°C" if w.gpu_temperature_c else "-",
             str(w.requests_served), str(w.queue_depth), *pool_columns(w), str(w.restarts), str(w.recycles),
             human_duration(w.uptime_s) if w.pid else "-", until(w),
             w.throttle_reason or w.last_exit or w.last_recycle_reason or w.memory_note] for w in workers]
    out.table(["MODEL", "STATE", "PID", "PRIVATE", "FILE", "GPU", "CPU", "TEMP", "REQUESTS", "QUEUE", "SEQS", "KV",
               "CACHED", "PREEMPTED", "RESTARTS", "RECYCLES", "UPTIME", "UNTIL", "THROTTLED / LAST EXIT / RECYCLE / NOTE"],
              rows)
    host = [f"GPU {g.index}: {g.temperature_c:.0f}°C, {human_bytes(g.memory_used_bytes)} of "
            f"{human_bytes(g.memory_total_bytes)}" for g in status.gpus]
    if status.HasField("cpu_temperature_c"):
        host.append(f"CPU: {status.cpu_temperature_c:.0f}°C")
    if status.standby_pids:
        host.append("standby: pid " + ", ".join(str(p) for p in status.standby_pids))
    for line in host:
        out.text(line + "\n")
    if status.gpu_note:
        out.text(f"GPU: {status.gpu_note}\n")
    for w in workers:
        out.text(f"{label(w, workers)} lines: {describe_lines(w.memory_lines)}\n")
    return 0


def describe_lines(lines: pb.MemoryLines) -> str:
    """'max_private_memory 420.0 MiB (derived), hard 630.0 MiB, …': each line, and where it came from."""
    def one(key: str, value: int) -> str:
        source = lines.source.get(key, "off")
        return f"{key} off" if source == "off" else f"{key} {human_bytes(value)} ({source})"

    soft = one("max_private_memory", lines.max_private_memory_bytes)
    if lines.hard_private_memory_bytes:
        soft += f", hard {human_bytes(lines.hard_private_memory_bytes)}"
    return ", ".join([soft, one("rlimit_data", lines.rlimit_data_bytes),
                      one("leak_threshold", lines.leak_threshold_bytes),
                      one("max_gpu_memory", lines.max_gpu_memory_bytes)])


def cmd_models(args, stub, out: Output) -> int:
    models = stub.ListModels(pb.ListModelsRequest()).models
    if getattr(args, "available", False):  # only what is on disk and not loaded
        models = [m for m in models if m.state == "AVAILABLE"]
    if out.as_json:
        for m in models:
            out.json(as_dict(m))
        return 0
    rows = [[m.name, m.state, m.architecture, m.quantization, human_bytes(m.file_size_bytes), str(m.n_ctx),
             str(m.context_length), human_bytes(m.estimate.private_peak_bytes), str(m.n_gpu_layers),
             "yes" if m.use_mmap else "no", m.source, m.path] for m in models]
    out.table(["NAME", "STATE", "ARCH", "QUANT", "SIZE", "N_CTX", "TRAINED", "MEMORY", "GPU LAYERS", "MMAP", "SOURCE",
               "PATH"], rows)
    for m in models:
        if m.state != "AVAILABLE":
            out.text(f"{m.name} lines: {describe_lines(m.memory_lines)}\n")
    return 0


def cmd_catalog(args, stub, out: Output) -> int:
    """What the catalog reads, and the stores it could: an Ollama store is offered, never read unasked."""
    reply = stub.ScanCatalog(pb.ScanCatalogRequest(find_stores=args.scan is not None, paths=args.scan or []))
    if out.as_json:
        out.json(as_dict(reply))
        return 0
    out.text(f"{reply.available} models available from {', '.join(reply.model_dirs) or 'no model directory'}\n")
    for problem in reply.problems:
        out.text(f"skipped: {problem}\n")
    config = reply.config_path or "the config file"
    for store in reply.stores:
        where = f"Ollama store {store.path} ({store.found_by})"
        if store.problem:
            out.text(f"{where}: {store.problem}\n")
        elif store.served:
            out.text(f"{where}: {store.models} models, {human_bytes(store.size_bytes)} — served\n")
        else:
            out.text(f"{where}: {store.models} models, {human_bytes(store.size_bytes)} — not served; to serve them "
                     f"where they lie, add {json.dumps(store.path)} to [supervisor] model_dirs in {config} and run "
                     f"`llmctl update`\n")
    if args.scan is not None and not reply.stores:
        out.text("no Ollama store found\n")
    return 0


def cmd_load(args, stub, out: Output) -> int:
    reply = stub.LoadModel(pb.LoadModelRequest(name=args.name, path=args.path, options=parse_options(args.option)))
    out.result(as_dict(reply.model), f"{reply.model.name}: loaded from {reply.model.path} ({reply.model.state})\n")
    return 0


def cmd_unload(args, stub, out: Output) -> int:
    stub.UnloadModel(pb.UnloadModelRequest(name=args.name))
    out.result({"name": args.name, "unloaded": True}, f"{args.name}: unloaded\n")
    return 0


def cmd_generate(args, stub, out: Output) -> int:
    call = stub.Generate(pb.GenerateRequest(model=args.model, prompt=args.prompt, options=sampling(args),
                                            keep_alive=args.keep_alive))
    stream(cancel_on_interrupt(call), out)  # the worker stops at the next token
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


def cmd_embed(args, stub, out: Output) -> int:
    """Plain: the vectors, one JSON array a line, in the order of the texts. --json: an object a text, then
    one with the request's figures."""
    reply = stub.Embed(pb.EmbedRequest(model=args.model, input=args.text, truncate=args.truncate,
                                       keep_alive=args.keep_alive))
    for i, embedding in enumerate(reply.embeddings):
        values = list(embedding.values)
        out.result({"index": i, "embedding": values}, json.dumps(values) + "\n")
    if out.as_json:
        out.json({"model": reply.model, "prompt_tokens": reply.prompt_tokens, "worker_pid": reply.worker_pid,
                  "total_s": reply.total_s})
    return 0


def cmd_tokenize(args, stub, out: Output) -> int:
    reply = stub.Tokenize(pb.TokenizeRequest(model=args.model, text=args.text, add_special=not args.no_special))
    out.result(as_dict(reply), f"{reply.count} tokens (context {reply.n_ctx}): {' '.join(map(str, reply.tokens))}\n")
    return 0


def _recycle(args, stub, out: Output, hard: bool) -> int:
    reply = stub.RecycleModel(pb.RecycleModelRequest(name=args.model, hard=hard))
    out.result({"model": args.model, "old_pid": reply.old_pid, "new_pid": reply.new_pid},
               f"{args.model}: worker {reply.old_pid} replaced by {reply.new_pid}\n")
    return 0


def cmd_recycle(args, stub, out: Output) -> int:
    return _recycle(args, stub, out, hard=False)


def cmd_restart(args, stub, out: Output) -> int:
    return _recycle(args, stub, out, hard=True)


def cmd_events(args, stub, out: Output) -> int:
    """Follows until interrupted; one line (or JSON object) per event."""
    import datetime

    for event in cancel_on_interrupt(stub.WatchEvents(pb.WatchEventsRequest(model=args.model))):
        if out.as_json:
            out.json(as_dict(event))
            continue
        when = datetime.datetime.fromtimestamp(event.time_unix).strftime("%H:%M:%S")
        figures = " ".join(f"{k}={v}" for k, v in sorted(event.figures.items()))
        out.text(f"{when} {event.model} {event.kind} pid={event.worker_pid} {event.state} {event.reason} {figures}".rstrip() + "\n")
    return 0


def cmd_start(args, stub, out: Output) -> int:
    reply = stub.StartModel(pb.StartModelRequest(name=args.model))
    out.result({"model": args.model, "pid": reply.pid, "already_running": reply.already_running},
               f"{args.model}: {'already running' if reply.already_running else 'started'}, pid {reply.pid}\n")
    return 0


def cmd_stop(args, stub, out: Output) -> int:
    reply = stub.StopModel(pb.StopModelRequest(name=args.model))
    stopped = f" (worker pid {reply.pid})" if reply.pid else " (no worker was running)"
    out.result({"model": args.model, "pid": reply.pid}, f"{args.model}: stopped{stopped}\n")
    return 0


def cmd_tail(args, stub, out: Output) -> int:
    """A worker's recent output; with -f, follows until interrupted or the model goes."""
    import datetime

    if args.lines < 0:
        raise UsageError("-n takes 0 (all kept) or more")
    for line in cancel_on_interrupt(stub.TailModel(pb.TailModelRequest(name=args.model, lines=args.lines,
                                                                        follow=args.follow))):
        if out.as_json:
            out.json(as_dict(line))
        else:
            when = datetime.datetime.fromtimestamp(line.time_unix).strftime("%H:%M:%S")
            out.text(f"{when} [{line.worker_pid}] {line.line}\n")
    return 0


def _reload(stub, out: Output, dry_run: bool) -> int:
    reply = stub.ReloadConfig(pb.ReloadConfigRequest(dry_run=dry_run))
    if out.as_json:
        out.json(as_dict(reply))
        return 1 if any(m.error for m in reply.models) else 0
    source = reply.config_path or "the embedded default config"
    if not (reply.models or reply.live_settings or reply.restart_settings):
        out.text(f"no changes in {source}\n")
        return 0
    verb = {"added": "load", "removed": "drain and unload", "changed": "apply"} if dry_run else \
           {"added": "loaded", "removed": "drained and unloaded", "changed": "applied"}
    for m in reply.models:
        line = f"{m.name}: {m.action}"
        if m.keys:
            line += f" ({', '.join(m.keys)})"
        line += f" — {'would ' if dry_run else ''}{verb[m.action]}"
        if m.action == "changed":
            line += ", worker recycled" if m.new_worker else ", running worker kept"
        if m.error:
            line += f" — FAILED: {m.error}"
        out.text(line + "\n")
    if reply.live_settings:
        out.text(f"settings {'to apply' if dry_run else 'applied'}: {', '.join(reply.live_settings)}\n")
    if reply.restart_settings:
        out.text(f"settings that need a restart of llm-supervisord: {', '.join(reply.restart_settings)}\n")
    if dry_run:
        out.text("`llmctl update` applies these\n")
    return 1 if any(m.error for m in reply.models) else 0


def cmd_reread(args, stub, out: Output) -> int:
    return _reload(stub, out, dry_run=True)


def cmd_update(args, stub, out: Output) -> int:
    return _reload(stub, out, dry_run=False)


def cmd_health(args, stub, out: Output) -> int:
    """grpc.health.v1, as a load balancer or a probe sees it: exit 0 only if everything asked about serves."""
    health = stub.health
    names = [args.model] if args.model else [m.name for m in stub.ListModels(pb.ListModelsRequest()).models
                                             if m.state != "AVAILABLE"]  # on disk only: no health to ask
    services = ([] if args.model else [""]) + [f"model/{name}" for name in names]
    rows = []
    for service in services:
        try:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            status = "UNKNOWN"
        rows.append([service or "(overall)", status])
    if out.as_json:
        for service, status in rows:
            out.json({"service": "" if service == "(overall)" else service, "status": status})
    else:
        out.table(["SERVICE", "STATUS"], rows)
    return 0 if all(status == "SERVING" for _, status in rows) else 1


def cmd_top(args, stub, out: Output) -> int:
    """Status refreshed every --interval seconds until interrupted (or --iterations times)."""
    import itertools
    import time

    if args.interval <= 0:
        raise UsageError("--interval must be more than 0")
    clear = not out.as_json and out.stream.isatty()
    for n in itertools.count(1):
        status = stub.Status(pb.StatusRequest())
        if out.as_json:
            out.json({"time_unix": time.time(), "workers": [as_dict(w) for w in status.workers],
                      "gpus": [as_dict(g) for g in status.gpus]})
        else:
            if clear:
                out.text("\x1b[H\x1b[2J")  # home, clear: redraw in place like top(1)
            out.text(f"llm-supervisor {status.version} — up {human_duration(status.uptime_s)} — "
                     f"{time.strftime('%H:%M:%S')} — every {args.interval:g} s\n")
            rows = [[label(w, status.workers), w.state, str(w.pid or "-"), human_bytes(w.private_memory_bytes),
                     human_bytes(w.gpu_memory_bytes) if w.gpu_memory_bytes else "-",
                     f"{w.gpu_temperature_c:.0f}°C" if w.gpu_temperature_c else "-",
                     f"{w.cpu_percent:.0f}%" if w.pid else "-",
                     f"{w.tokens_per_second:.1f}" if w.tokens_per_second else "-",
                     str(w.requests_served), str(w.queue_depth), *pool_columns(w)] for w in status.workers]
            out.table(["MODEL", "STATE", "PID", "PRIVATE", "GPU", "TEMP", "CPU", "TOK/S", "REQUESTS", "QUEUE", "SEQS",
                       "KV", "CACHED", "PREEMPTED"], rows)
            for g in status.gpus:
                out.text(f"GPU {g.index}: {g.temperature_c:.0f}°C, {human_bytes(g.memory_used_bytes)} of "
                         f"{human_bytes(g.memory_total_bytes)}\n")
        if args.iterations and n >= args.iterations:
            return 0
        time.sleep(args.interval)
    return 0


def cmd_estimate(args, stub, out: Output) -> int:
    """What a model would cost, without loading it: the parts, host and GPU, at load and at full context."""
    reply = stub.EstimateModel(pb.EstimateModelRequest(path=args.path, options=parse_options(args.option)))
    if out.as_json:
        out.json(as_dict(reply))
        return 0
    e = reply.estimate

    def size(n: int) -> str:
        return human_bytes(n) if n else "-"

    out.text(f"{reply.path}: {reply.architecture}, {human_bytes(reply.file_size_bytes)} file, n_ctx {e.n_ctx}, "
             f"{e.replicas} replica{'s' if e.replicas != 1 else ''}\n")
    mapped = f"+ {human_bytes(e.weights_mapped_bytes)} mapped from the file (page cache, shared)" if e.weights_mapped_bytes else ""
    if e.weights_repacked_bytes and e.weights_mapped_bytes:
        mapped += f"; {human_bytes(e.weights_repacked_bytes)} repacked by the CPU backend (private, per replica)"
    rows = [
        ["weights", size(e.weights_private_bytes), size(e.weights_gpu_bytes), mapped],
        ["KV cache", size(e.kv_cache_cpu_bytes), size(e.kv_cache_gpu_bytes),
         f"one pool of {e.n_ctx} cells for all {e.parallel} sequences (parallel)"],
        ["logits", size(e.outputs_bytes), "-", f"n_vocab floats for each of the {e.parallel} sequences"],
        ["compute at load", size(e.compute_cpu_at_load_bytes), size(e.compute_gpu_bytes), "the warm-up pass"],
        ["compute, full context", size(e.compute_cpu_peak_bytes), size(e.compute_gpu_bytes), "what budgets count"],
        ["runtime", size(e.runtime_bytes), size(e.gpu_runtime_bytes), "Python, llama_cpp, gRPC; CUDA context"],
        ["total at load", size(e.private_at_load_bytes), size(e.gpu_bytes), "per worker"],
        ["total, full context", size(e.private_peak_bytes), size(e.gpu_bytes), "per worker"],
    ]
    if e.replicas > 1:
        rows.append([f"× {e.replicas} replicas", size(e.total_private_bytes), size(e.total_gpu_bytes), "the mapped weights once"])
    out.table(["PART", "HOST PRIVATE", "GPU", ""], rows)
    return 0
