"""The public gRPC service. It translates; the registry and the model runtimes do the work."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from contextlib import aclosing
from typing import AsyncIterator

import grpc
import structlog

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc

from supervisor import __version__
from supervisor.settings.config import ConfigError, ModelConfig
from supervisor.errors import ApiError, exhausted, invalid, precondition
from supervisor.catalog.catalog import Available, find_stores, store_places
from supervisor.decide.estimate import Estimate, estimate
from supervisor.settings.gguf_file import GGUFInfo
from supervisor.observe.fanout import QUEUED, FellBehind, too_many_followers
from supervisor.observe.gpu import GpuReading
from supervisor.supervision.replica import Replica
from supervisor.process.worker_process import WorkerProcess
from supervisor.decide.memory_lines import MemoryLines
from supervisor.decide.policies import cpu_percent
from supervisor.observe.procfs import read_memory
from supervisor.catalog.registry import Registry
from supervisor.catalog.reload_plan import Plan
from supervisor.catalog.reloader import Reloader
from supervisor.server.metrics import RequestMetrics
from supervisor.process.output import OutputLine
from supervisor.serving.runtime import ModelRuntime
from supervisor.catalog.persisted import LoadedModel
from supervisor.api.inference import Inference

log = structlog.get_logger("llm_supervisor.api")


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    await context.abort(error.code, error.message)


MAX_SCAN_PATHS = 16


def home_directory() -> Path | None:
    """The daemon's user's home, if it has one (a DynamicUser service may not)."""
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        return None


class SupervisorService(supervisor_pb2_grpc.SupervisorServicer):
    def __init__(self, registry: Registry, clock=time.monotonic, metrics: RequestMetrics | None = None,
                 reloader: Reloader | None = None) -> None:
        self.registry = registry
        self.inference = Inference(registry, metrics)
        self.reloader = reloader
        self._clock = clock
        self._started = clock()

    async def _relay(self, chunks: AsyncIterator[pb.GenerateChunk], context) -> AsyncIterator[pb.GenerateChunk]:
        label_api()
        try:
            # aclosing: a cancelled client must free the model's slot now, not when the generator is collected.
            async with aclosing(chunks) as stream:
                async for chunk in stream:
                    yield chunk
        except ApiError as e:
            await _abort(context, e)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        async with aclosing(self._relay(self.inference.generate(request, "grpc"), context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        async with aclosing(self._relay(self.inference.chat(request, "grpc"), context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            return await (await self.inference.runtime(request.model)).tokenize(request)
        except ApiError as e:
            await _abort(context, e)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        label_api()
        try:
            return await self.inference.embed(request, "grpc")
        except ApiError as e:
            await _abort(context, e)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        try:
            if not request.path:
                raise invalid("path is empty: give a GGUF file inside a model directory")
            runtime = await self.registry.load_by_api(LoadedModel(request.name, request.path, dict(request.options)))
        except ApiError as e:
            await _abort(context, e)
        log.info("model_loaded", model=runtime.name, path=str(runtime.gguf.path), source="api")
        return pb.LoadModelResponse(model=model_info(runtime))

    async def StartModel(self, request: pb.StartModelRequest, context) -> pb.StartModelResponse:
        try:
            started = await asyncio.gather(*(replica.start_by_hand() for replica in self.registry.get(request.name).replicas))
        except ApiError as e:
            await _abort(context, e)
        (worker, _), running = started[0], all(was for _, was in started)
        log.info("model_started", model=request.name, worker_pid=worker.pid, already_running=running)
        return pb.StartModelResponse(pid=worker.pid, already_running=running)

    async def StopModel(self, request: pb.StopModelRequest, context) -> pb.StopModelResponse:
        try:
            stopped = await asyncio.gather(*(replica.stop_by_hand("stopped by hand (llmctl stop)")
                                             for replica in self.registry.get(request.name).replicas))
        except ApiError as e:
            await _abort(context, e)
        worker = stopped[0]
        log.info("model_stopped", model=request.name, worker_pid=worker.pid if worker else 0)
        return pb.StopModelResponse(pid=worker.pid if worker else 0)

    async def TailModel(self, request: pb.TailModelRequest, context) -> AsyncIterator[pb.LogLine]:
        try:
            output = self.registry.get(request.name).output
            refused = request.follow and too_many_followers(
                [self.registry.events.followers, *(rt.output.followers for rt in list(self.registry.models.values()))],
                self.registry.config.max_followers)
            if refused:
                raise exhausted(refused)
        except ApiError as e:
            await _abort(context, e)
            return
        # Follow before reading what is kept: nothing comes between the two (no await), so no line is lost.
        follower = output.followers.follow() if request.follow else None
        try:
            for line in output.recent(request.lines):
                yield log_line(line)
            while follower is not None:
                line = await follower.get()
                if line is None:  # the model was unloaded, or the supervisor is stopping
                    return
                yield log_line(line)
        except FellBehind as e:
            await _abort(context, exhausted(f"fell behind: {e.unread} lines not read (at most {QUEUED} may wait "
                                            f"unread); tail again"))
        finally:
            if follower is not None:
                output.followers.unfollow(follower)

    async def ReloadConfig(self, request: pb.ReloadConfigRequest, context) -> pb.ReloadConfigResponse:
        if self.reloader is None:
            await _abort(context, ApiError(grpc.StatusCode.UNIMPLEMENTED, "this daemon was started without a config to reload"))
        try:
            change, errors = await self.reloader.reload(request.dry_run)
        except ConfigError as e:
            await _abort(context, precondition(f"{e}; nothing was changed"))
        return reload_response(change, errors, self.reloader.config_path, applied=not request.dry_run)

    async def EstimateModel(self, request: pb.EstimateModelRequest, context) -> pb.EstimateModelResponse:
        try:
            gguf, figures = await self.registry.estimate(request.path, dict(request.options))
        except ApiError as e:
            await _abort(context, e)
        return pb.EstimateModelResponse(path=str(gguf.path), architecture=gguf.architecture,
                                        file_size_bytes=gguf.file_size, estimate=estimate_message(figures))

    async def ScanCatalog(self, request: pb.ScanCatalogRequest, context) -> pb.ScanCatalogResponse:
        if len(request.paths) > MAX_SCAN_PATHS or any(not p.startswith("/") or "\x00" in p for p in request.paths):
            await _abort(context, invalid(f"paths: at most {MAX_SCAN_PATHS}, each absolute (on the daemon's host)"))
        catalog = self.inference.catalog
        found = await catalog.scanner.rescan(fresh=True)
        places = [(Path(p), "asked") for p in request.paths]
        if request.find_stores:
            places += store_places(os.environ, home_directory())
        stores = await asyncio.to_thread(find_stores, places, self.registry.config.model_dirs) if places else []
        return pb.ScanCatalogResponse(
            model_dirs=[str(d) for d in self.registry.config.model_dirs], available=len(await catalog.known()),
            problems=[*found.problems, *catalog.scanner.loaded_problems], config_path=str(self.reloader.config_path) if self.reloader else "",
            stores=[pb.OllamaStore(path=str(s.path), found_by=s.found_by, models=s.models, size_bytes=s.size,
                                   served=s.served, problem=s.problem) for s in stores])

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        try:
            await self.registry.unload(request.name)
        except ApiError as e:
            await _abort(context, e)
        log.info("model_unloaded", model=request.name)
        return pb.UnloadModelResponse()

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        loaded = [model_info(rt) for rt in list(self.registry.models.values())]
        return pb.ListModelsResponse(models=loaded + [available_info(*entry)
                                                      for entry in await self.inference.catalog.listing()])

    async def RecycleModel(self, request: pb.RecycleModelRequest, context) -> pb.RecycleModelResponse:
        try:
            # One replica after another, so the others serve meanwhile; the reply names the first's workers.
            replaced = [await recycle_by_hand(replica, request.hard) for replica in self.registry.get(request.name).replicas]
        except ApiError as e:
            await _abort(context, e)
        old, fresh = replaced[0]
        return pb.RecycleModelResponse(old_pid=old.pid, new_pid=fresh.pid)

    async def WatchEvents(self, request: pb.WatchEventsRequest, context) -> AsyncIterator[pb.Event]:
        followers = self.registry.events.followers
        refused = too_many_followers(
            [followers, *(rt.output.followers for rt in list(self.registry.models.values()))],
            self.registry.config.max_followers)
        if refused:
            await _abort(context, exhausted(refused))
            return
        follower = followers.follow()
        try:
            # Where things stand first, like `kubectl get -w`; it also tells the client it is subscribed.
            for replica in self.registry.replicas():
                if not request.model or replica.name == request.model:
                    yield pb.Event(time_unix=time.time(), kind="snapshot", model=replica.name, state=replica.status,
                                   worker_pid=replica.worker.pid if replica.worker else 0,
                                   reason=replica.fatal_reason or replica.recycles.last_reason or replica.last_exit)
            while True:
                event = await follower.get()
                if event is None:  # the supervisor is shutting down
                    return
                if request.model and event.model != request.model:
                    continue
                yield pb.Event(time_unix=event.time, kind=event.kind, model=event.model, worker_pid=event.worker_pid,
                               reason=event.reason, state=event.state,
                               figures={k: str(v) for k, v in event.figures.items()})
        except FellBehind as e:
            # Ended rather than left with a gap: watching again starts with a fresh snapshot.
            await _abort(context, exhausted(f"fell behind: {e.unread} events not read (at most {QUEUED} may wait "
                                            f"unread); watch again for where things stand now"))
        finally:
            followers.unfollow(follower)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        monitor = self.registry.monitor
        return pb.StatusResponse(
            version=__version__,
            uptime_s=self._clock() - self._started,
            workers=[worker_status(rt, replica) for rt in list(self.registry.models.values()) for replica in rt.replicas],
            standby_pids=self.registry.standby.pids if self.registry.standby else [],
            gpus=[gpu_status(r) for r in (monitor.last_gpus.readings if monitor.last_gpus else [])],
            cpu_temperature_c=monitor.last_cpu_temperature,
            gpu_note=monitor.gpu_note,
        )


def label_api() -> None:
    """Every log line this call causes says it came through gRPC. Each call runs in a task of its own,
    whose context goes with it: nothing to undo."""
    structlog.contextvars.bind_contextvars(api="grpc")


def log_line(line: OutputLine) -> pb.LogLine:
    return pb.LogLine(time_unix=line.time, worker_pid=line.worker_pid, line=line.line)


def reload_response(change: Plan, errors: dict[str, str], path: str, applied: bool) -> pb.ReloadConfigResponse:
    models = ([pb.ModelChange(name=m.name, action="added") for m in change.added]
              + [pb.ModelChange(name=name, action="removed") for name in change.removed]
              + [pb.ModelChange(name=c.config.name, action="changed", keys=c.keys, new_worker=c.new_worker)
                 for c in change.changed])
    for m in models:
        m.error = errors.get(m.name, "")
    return pb.ReloadConfigResponse(config_path=path, models=models, live_settings=change.live_keys,
                                   restart_settings=change.restart_keys, applied=applied)


def estimate_message(e: Estimate) -> pb.MemoryEstimate:
    return pb.MemoryEstimate(
        n_ctx=e.n_ctx, replicas=e.replicas, weights_mapped_bytes=e.weights_mapped,
        weights_private_bytes=e.weights_private, weights_gpu_bytes=e.weights_gpu, kv_cache_cpu_bytes=e.kv_cpu,
        kv_cache_gpu_bytes=e.kv_gpu, compute_cpu_at_load_bytes=e.compute_cpu_at_load,
        compute_cpu_peak_bytes=e.compute_cpu_peak, compute_gpu_bytes=e.compute_gpu, runtime_bytes=e.runtime,
        gpu_runtime_bytes=e.gpu_runtime, private_at_load_bytes=e.private_at_load, private_peak_bytes=e.private_peak,
        gpu_bytes=e.gpu, total_private_bytes=e.total_private, total_gpu_bytes=e.total_gpu,
        weights_repacked_bytes=e.weights_repacked, outputs_bytes=e.outputs, parallel=e.parallel)


async def recycle_by_hand(replica: Replica, hard: bool) -> tuple[WorkerProcess, WorkerProcess]:
    """(old worker, its replacement once serving)."""
    old = await replica.ready_worker()
    if hard:
        replica.recycles.hard(old, "restarted by hand (llmctl restart)", kind="by_hand")
        await old.exited.wait()
        return old, await replica.ready_worker()
    return old, await replica.recycles.by_hand("recycled by hand (llmctl recycle)")


def model_info(runtime: ModelRuntime) -> pb.ModelInfo:
    c, g = runtime.config, runtime.gguf
    # llama.cpp may round n_ctx up (to a multiple of 256): report what a worker really has.
    infos = [replica.worker.info for replica in runtime.replicas if replica.worker is not None and replica.worker.info is not None]
    n_ctx = infos[0].n_ctx if infos else c.n_ctx
    return pb.ModelInfo(
        name=c.name, path=str(g.path), state=runtime.state, n_ctx=n_ctx, n_gpu_layers=c.n_gpu_layers,
        use_mmap=c.use_mmap, source=runtime.source, architecture=g.architecture, file_size_bytes=g.file_size,
        has_chat_template=g.has_chat_template, estimate=estimate_message(runtime.estimate),
        memory_lines=memory_lines_message(runtime.replicas[0].lines), embedding=c.embedding,
        quantization=g.file_type, context_length=g.n_ctx_train,
    )


def available_info(model: Available, gguf: GGUFInfo | None, config: ModelConfig | None) -> pb.ModelInfo:
    """A model on disk, not loaded: what its header says, and what it would cost with the settings it
    would load with."""
    info = pb.ModelInfo(name=model.name, path=str(model.path), state="AVAILABLE", source=model.source)
    if gguf is not None:
        info.MergeFrom(pb.ModelInfo(architecture=gguf.architecture, file_size_bytes=gguf.file_size,
                                    has_chat_template=gguf.has_chat_template, quantization=gguf.file_type,
                                    context_length=gguf.n_ctx_train))
    if config is not None:
        info.MergeFrom(pb.ModelInfo(n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers, use_mmap=config.use_mmap,
                                    embedding=config.embedding))
        if gguf is not None:
            info.estimate.CopyFrom(estimate_message(estimate(gguf.shape, config)))
    return info


def memory_lines_message(lines: MemoryLines) -> pb.MemoryLines:
    return pb.MemoryLines(max_private_memory_bytes=lines.max_private_memory or 0,
                          hard_private_memory_bytes=lines.hard_private_memory or 0,
                          rlimit_data_bytes=lines.rlimit_data or 0, leak_threshold_bytes=lines.leak_threshold or 0,
                          max_gpu_memory_bytes=lines.max_gpu_memory or 0, source=dict(lines.sources))


def gpu_status(reading: GpuReading) -> pb.GpuStatus:
    return pb.GpuStatus(index=reading.index, temperature_c=reading.temperature_c, memory_used_bytes=reading.memory_used,
                        memory_total_bytes=reading.memory_total, throttle_reasons=reading.throttle_reasons)


def worker_status(runtime: ModelRuntime, replica: Replica) -> pb.WorkerStatus:
    worker = replica.worker
    status = pb.WorkerStatus(model=runtime.name, replica=replica.index, state=replica.status, queue_depth=replica.queue.waiting,
                             restarts=replica.restarts, last_exit=replica.fatal_reason or replica.last_exit,
                             recycles=replica.recycles.count, last_recycle_reason=replica.recycles.last_reason,
                             throttle_reason=replica.throttle_reason,
                             gpu_temperature_c=replica.gpu_temperature or 0,
                             tokens_per_second=runtime.last_tokens_per_second, memory_note=replica.memory_note,
                             memory_lines=memory_lines_message(replica.lines))
    if worker is not None and worker.alive:
        status.memory_lines.rlimit_data_bytes = worker.spawn.rlimit_data or 0  # set at its start: a reload waits
        status.pid = worker.pid
        status.requests_served = worker.requests_served
        status.uptime_s = worker.uptime()
        status.unload_in_s = replica.unload_in()
        latest = worker.watch.periodic[-1] if worker.watch.periodic else None
        memory = read_memory(worker.pid)  # fresh, not the last poll's: status is asked for rarely
        if memory is not None:
            status.private_memory_bytes = memory.private
            status.file_rss_bytes = memory.rss_file
        if latest is not None and latest.gpu is not None:
            status.gpu_memory_bytes = latest.gpu
        status.cpu_percent = cpu_percent(worker.watch.periodic) or 0.0
        pool = worker.pool()
        if pool is not None:
            status.pool.CopyFrom(pb.PoolStatus(parallel=pool.parallel, sequences_active=pool.active,
                                               cells_used=pool.cells, n_ctx=pool.n_ctx,
                                               sequences_cached=pool.cached, preemptions=pool.preemptions))
    return status
