"""Prometheus metrics (prometheus-client) on the optional `[metrics] address`.

What the supervisor already knows — each worker's memory, CPU and GPU figures, queues, recycles,
restarts, the GPUs' temperatures — is read when Prometheus scrapes, never kept twice; what happens per
request (outcome, tokens, time to first token, tokens/s) is counted as requests finish. Everything replicas
in one CollectorRegistry owned by the daemon, not prometheus-client's global one. A model's series go
with the model: an unloaded one is no longer in the scrape, and its counters are freed.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llm_supervisor.v1 import supervisor_pb2 as pb

from supervisor.settings.config import split_host_port
from supervisor.observe.monitor import Monitor
from supervisor.decide.policies import cpu_percent

PREFIX = "llm_supervisor"


class RequestMetrics:
    """Counted as requests finish (on the event loop), read at scrape time (on the HTTP server's thread).

    It is its own collector: before each scrape it removes the series of models no longer loaded, so
    loading and unloading models under ever new names does not grow the scrape or the memory. A request
    that finishes after its model was unloaded (one that drained) is counted, then removed at the next
    scrape."""

    def __init__(self, registry: CollectorRegistry, loaded: Callable[[], Iterable[str]]) -> None:
        self._loaded = loaded
        self._lock = threading.Lock()  # the label sets change on the loop while a scrape forgets on its thread
        self._codes: dict[str, set[tuple[str, str]]] = {}  # model → the (status code, API) it has series for
        # api: "grpc", "openai" or "ollama"; code: the gRPC status code (the HTTP APIs map theirs from it).
        self.requests = Counter(f"{PREFIX}_requests", "Generate, Chat and Embed requests finished, by gRPC status code "
                                "and the API they came through", ["model", "code", "api"], registry=None)
        self.tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=None)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From the worker taking the request to its first token",
            ["model"], registry=None, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens_per_second = Histogram(
            f"{PREFIX}_tokens_per_second", "Generation speed of each request", ["model"], registry=None,
            buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
        registry.register(self)

    def _metrics(self) -> tuple:
        return self.requests, self.tokens, self.time_to_first_token, self.tokens_per_second

    def describe(self):
        for metric in self._metrics():
            yield from metric.describe()

    def collect(self):
        # Labelled first, loaded second: a model loaded (and counted) in between is in both, never forgotten.
        with self._lock:
            labelled = list(self._codes)
        self.forget(unloaded(labelled, set(self._loaded())))
        for metric in self._metrics():
            yield from metric.collect()

    def finished(self, model: str, last: pb.GenerateChunk, api: str = "grpc") -> None:
        with self._lock:
            self._ok(model, api)
            self.tokens.labels(model).inc(last.usage.completion_tokens)
            if last.usage.completion_tokens:
                self.time_to_first_token.labels(model).observe(last.timings.time_to_first_token_s)
                self.tokens_per_second.labels(model).observe(last.timings.tokens_per_second)

    def embedded(self, model: str, api: str = "grpc") -> None:
        """An Embed request served: an OK request that generated no token."""
        with self._lock:
            self._ok(model, api)

    def _ok(self, model: str, api: str) -> None:
        self._codes.setdefault(model, set()).add(("OK", api))
        self.requests.labels(model, "OK", api).inc()

    def failed(self, model: str, code: str, api: str = "grpc") -> None:
        with self._lock:
            self._codes.setdefault(model, set()).add((code, api))
            self.requests.labels(model, code, api).inc()

    def forget(self, models: Iterable[str]) -> None:
        """Remove every series of these models."""
        with self._lock:
            for model in models:
                for code, api in self._codes.pop(model, ()):
                    self.requests.remove(model, code, api)
                for metric in self._metrics()[1:]:
                    try:
                        metric.remove(model)
                    except KeyError:  # no series yet: only failures were counted
                        pass


def unloaded(labelled: Iterable[str], loaded: set[str]) -> list[str]:
    """The models with series that are no longer loaded."""
    return [model for model in labelled if model not in loaded]


class StateCollector:
    """Read at scrape time from the models and the monitor (on the HTTP server's thread: it copies
    before it iterates and reads only the latest sample of each worker)."""

    def __init__(self, models: Callable[[], list], monitor: Monitor) -> None:
        self._models = models
        self._monitor = monitor

    def collect(self):
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        private = gauge("worker_private_memory_bytes", "RssAnon + swap of the worker", ["model", "pid"])
        file_rss = gauge("worker_file_rss_bytes", "File-backed RSS (mmap'd weights) of the worker", ["model", "pid"])
        gpu = gauge("worker_gpu_memory_bytes", "GPU memory of the worker (NVML)", ["model", "pid"])
        cpu = gauge("worker_cpu_percent", "CPU use of the worker between the last two polls, % of one core",
                    ["model", "pid"])
        active = gauge("worker_sequences_active", "Requests the worker is generating (or evaluating the prompt of)",
                       ["model", "pid"])
        parallel = gauge("worker_sequences_parallel", "Requests the worker may generate at once (parallel)",
                         ["model", "pid"])
        cells = gauge("worker_kv_cells_used", "KV cells in use, cached sequences' included", ["model", "pid"])
        n_ctx = gauge("worker_kv_cells", "KV cells in the worker's pool (n_ctx)", ["model", "pid"])
        cached = gauge("worker_sequences_cached", "Finished sequences kept for a follow-up sharing their prefix",
                       ["model", "pid"])
        preemptions = CounterMetricFamily(f"{PREFIX}_worker_preemptions",
                                          "Requests paused because the KV pool was full", labels=["model", "pid"])
        up = gauge("model_serving", "1 while the model has a worker taking requests", ["model"])
        queue = gauge("queue_depth", "Requests waiting for the model", ["model"])
        temperature = gauge("model_gpu_temperature_celsius", "Hottest GPU the model runs on", ["model"])
        recycles = CounterMetricFamily(f"{PREFIX}_recycles", "Workers replaced, by the rule that decided",
                                       labels=["model", "reason"])
        restarts = CounterMetricFamily(f"{PREFIX}_restarts", "Workers restarted after a crash", labels=["model"])
        for runtime in list(self._models()):
            name, replicas = runtime.name, runtime.replicas
            up.add_metric([name], 1.0 if runtime.serving else 0.0)
            queue.add_metric([name], runtime.waiting)
            restarts.add_metric([name], sum(replica.restarts for replica in replicas))
            by_kind = sum((collections.Counter(dict(replica.recycles.by_kind)) for replica in replicas), collections.Counter())
            for kind, count in by_kind.items():
                recycles.add_metric([name, kind], count)
            hottest = max((replica.gpu_temperature for replica in replicas if replica.gpu_temperature is not None), default=None)
            if hottest is not None:
                temperature.add_metric([name], hottest)
            for worker in (replica.worker for replica in replicas):
                if worker is None or not worker.alive or not worker.watch.periodic:
                    continue
                latest, labels = worker.watch.periodic[-1], [name, str(worker.pid)]
                private.add_metric(labels, latest.private)
                file_rss.add_metric(labels, latest.file_rss)
                if latest.gpu is not None:
                    gpu.add_metric(labels, latest.gpu)
                share = cpu_percent(list(worker.watch.periodic))  # a copy: the event loop appends meanwhile
                if share is not None:
                    cpu.add_metric(labels, share)
                pool = worker.pool()
                if pool is not None:
                    for family, value in ((active, pool.active), (parallel, pool.parallel), (cells, pool.cells),
                                          (n_ctx, pool.n_ctx), (cached, pool.cached), (preemptions, pool.preemptions)):
                        family.add_metric(labels, value)
        yield from (private, file_rss, gpu, cpu, active, parallel, cells, n_ctx, cached, preemptions,
                    up, queue, temperature, recycles, restarts)
        yield from self._host()

    def _host(self):
        gpus = self._monitor.last_gpus
        if gpus is not None:
            temperature = GaugeMetricFamily(f"{PREFIX}_gpu_temperature_celsius", "GPU temperature (NVML)", labels=["gpu"])
            used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use, all processes",
                                     labels=["gpu"])
            for r in gpus.readings:
                temperature.add_metric([str(r.index)], r.temperature_c)
                used.add_metric([str(r.index)], r.memory_used)
            yield from (temperature, used)
        if self._monitor.last_cpu_temperature is not None:
            cpu = GaugeMetricFamily(f"{PREFIX}_cpu_temperature_celsius", "Hottest CPU sensor (psutil)")
            cpu.add_metric([], self._monitor.last_cpu_temperature)
            yield cpu


def serve_metrics(address: str, models: Callable[[], list], monitor: Monitor) -> tuple[RequestMetrics, object]:
    """Start the /metrics HTTP server on its own thread; returns the request metrics and the server."""
    registry = CollectorRegistry()
    registry.register(StateCollector(models, monitor))
    requests = RequestMetrics(registry, lambda: [runtime.name for runtime in models()])
    host, port = split_host_port(address)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return requests, server
