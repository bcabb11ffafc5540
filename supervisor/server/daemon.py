"""llm-supervisord: the daemon's entry point and main loop.

    llm-supervisord [--config FILE] [--address ADDR] [--http-address HOST:PORT] [--log-level LEVEL]
    llm-supervisord --check-build

With no --config it runs the embedded default, which generates (once) and serves a tiny `demo` model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import grp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import psutil
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_supervisor.v1 import supervisor_pb2, supervisor_pb2_grpc
from worker.limits import forbid_ptrace

from supervisor.api.grpc_service import SupervisorService
from supervisor.api.http_server import HttpApi
from supervisor.api.ollama_api import Ollama
from supervisor.api.openai_api import OpenAI
from supervisor.settings.config import ConfigError, Host, SupervisorConfig, load_config, split_host_port
from supervisor.settings.demo_model import write_model
from supervisor.errors import ApiError
from supervisor.observe.events import EventBus
from supervisor.server.liveness import LIVENESS_SERVICE, WatchPasses, report_liveness
from supervisor.tasks import Background
from supervisor.observe.gpu import GpuSource, Nvml
from supervisor.server.metrics import serve_metrics
from supervisor.observe.monitor import Monitor
from supervisor.server.notify import Notifier, summary
from supervisor.server.logs import configure
from supervisor.catalog.registry import Registry
from supervisor.server.security import AuthInterceptor, read_tokens, server_credentials
from supervisor.catalog.reloader import Reloader
from supervisor.serving.runtime import ModelRuntime
from supervisor.process.standby import StandbyPool

log = structlog.get_logger("llm_supervisor.daemon")

SERVICE_NAME = supervisor_pb2.DESCRIPTOR.services_by_name["Supervisor"].full_name
# Unix socket paths are limited to 107 bytes by sockaddr_un.
MAX_SOCKET_PATH = 100


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model: SERVING while a worker takes requests."""
    return f"model/{model}"


def unix_socket_path(address: str) -> Path | None:
    if address.startswith("unix://"):
        return Path(address[len("unix://"):])
    if address.startswith("unix:"):
        return Path(address[len("unix:"):])
    return None


def _claim_socket(path: Path) -> None:
    """Refuse to start over a live supervisor; clear a stale socket left by a crashed one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is already listening on {path}; stop it or pick another --address")


def listen(server: grpc.aio.Server, config: SupervisorConfig) -> Path | None:
    """Bind the API's address; the unix socket's path, or None for TCP. TCP is TLS unless the config
    says `insecure = true` in so many words, and then the log says so at every start."""
    path = unix_socket_path(config.address)
    if path is not None:
        if config.socket_group:
            try:
                grp.getgrnam(config.socket_group)
            except KeyError:
                raise ConfigError(f"[supervisor] socket_group {config.socket_group!r}: no such group") from None
        _claim_socket(path)
        server.add_insecure_port(config.address)
        return path
    if config.tls_cert is not None:
        bound = server.add_secure_port(config.address, server_credentials(config))
    elif config.insecure:
        bound = server.add_insecure_port(config.address)
        log.critical("insecure_tcp", address=config.address,
                     reason="insecure = true: the API listens on TCP without TLS; anyone on the network can read "
                            "prompts and replies" + ("" if config.inference_tokens_file or config.admin_tokens_file
                                                     else ", and call it without a token"))
    else:
        raise ConfigError(f"{config.address} is TCP: give [tls] cert and key, or write insecure = true in "
                          f"[supervisor] to listen without TLS")
    if bound == 0:
        raise ConfigError(f"cannot listen on {config.address}")
    return None


def ensure_demo_model(config: SupervisorConfig) -> None:
    demo = config.model_dirs[0] / "demo.gguf"
    if not demo.exists():
        log.info("demo_model_generated", path=str(demo))
        write_model(demo)


def status_line(registry: Registry, now: float) -> str:
    replicas = registry.replicas()
    recycled = [replica for replica in replicas if replica.recycles.last_at is not None]
    last = max(recycled, key=lambda replica: replica.recycles.last_at, default=None)
    return summary([replica.status for replica in replicas],
                   (last.name, last.recycles.last_reason, now - last.recycles.last_at) if last else None)


async def watch(registry: Registry, monitor: Monitor, notifier: Notifier, passes: WatchPasses) -> None:
    """The watchdog loop: measure every worker each interval and act on what the policies decide.

    It is also what proves the daemon alive: WATCHDOG=1 goes out only from here, while the last pass
    completed, and `passes` feeds the liveness service. A pass that never ends (an NVML call hung on a
    GPU that fell off the bus) or fails every time (logged and counted, never the end of the loop) gets
    the service restarted. NVML is read on its own thread so that such a hang stalls this loop, not the
    API. poll_interval is read each pass: a reload may change it.
    """
    nvml = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
    loop = asyncio.get_running_loop()
    due = 0.0
    try:
        while True:
            interval = registry.config.poll_interval
            step = min(interval, notifier.watchdog_s / 2) if notifier.watchdog_s else interval
            await asyncio.sleep(step)
            if loop.time() >= due:
                due = loop.time() + interval - step / 2  # half a step early: sleeps overshoot, ticks must not slip
                try:
                    await watch_pass(registry, monitor, notifier, nvml)
                    passes.completed(time.monotonic())
                except Exception:
                    passes.failed()
                    log.exception("watch_pass_failed", failing=passes.failing, failures=passes.failures)
            if not passes.failing:
                notifier.watchdog()
    finally:
        nvml.shutdown(wait=False, cancel_futures=True)  # a hung NVML call must not hold up the exit


async def watch_pass(registry: Registry, monitor: Monitor, notifier: Notifier, nvml: ThreadPoolExecutor) -> None:
    """One pass over every worker, on one NVML read."""
    gpus = await asyncio.get_running_loop().run_in_executor(nvml, monitor.host)
    for replica in registry.replicas():
        try:
            replica.watchdog.tick(gpus)
        except Exception:  # one model's trouble must not stop the watch over the others
            log.exception("watch_failed", model=replica.label)
    notifier.status(status_line(registry, time.monotonic()))


async def serve(config: SupervisorConfig, host: Host, stop: asyncio.Event | None = None,
                gpu: GpuSource | None = None, reread: Callable[[], SupervisorConfig] | None = None,
                hangup: asyncio.Event | None = None, config_path: str = "") -> int:
    """Serve until `stop` is set. `reread` reads the config again (for ReloadConfig; without it the
    config never changes); each time `hangup` is set (SIGHUP) the config is reloaded as `llmctl update` does."""
    stop = stop or asyncio.Event()
    hangup = hangup or asyncio.Event()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.runtime_dir.mkdir(parents=True, exist_ok=True)
    socket_root = config.runtime_dir if len(str(config.runtime_dir)) < MAX_SOCKET_PATH - 40 else None
    socket_dir = Path(tempfile.mkdtemp(prefix="workers-", dir=socket_root))  # mode 0700: ours alone

    auth = AuthInterceptor(read_tokens(config))
    server = grpc.aio.server(interceptors=[auth], options=[
        ("grpc.max_receive_message_length", config.max_message_size),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
    ])
    health_servicer = health.aio.HealthServicer()
    health_tasks = Background()  # health updates from synchronous code: each a task, held until it ends
    passes = WatchPasses(last_completed=time.monotonic())

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def on_change(runtime: ModelRuntime) -> None:
        # A model takes requests while a worker serves or one is on its way (a recycle, a start on demand):
        # its requests wait in the queue then. Not when it is FATAL, STOPPED, too hot, or gone.
        live = runtime.accepting and runtime.name in registry.models
        health_tasks.keep(health_servicer.set(model_health_name(runtime.name), serving if live else not_serving))

    def on_liveness(alive: bool) -> None:
        if not alive:
            log.critical("watch_loop_stalled", last_pass_s=round(time.monotonic() - passes.last_completed, 1),
                         failing=passes.failing,
                         reason="no recycle, unload, hang or temperature check runs until it completes a pass")
        health_tasks.keep(health_servicer.set(LIVENESS_SERVICE, serving if alive else not_serving))

    def loop_ended(task: asyncio.Task) -> None:
        """None of the daemon's loops may end while it runs: one that does is a bug, said loudly (liveness
        then turns NOT_SERVING once the watch passes stop)."""
        error = None if task.cancelled() else task.exception()
        log.critical("loop_ended", loop=task.get_name(), error=repr(error))

    monitor = Monitor(gpu or Nvml.open())
    notifier = Notifier(host.env)
    standby = StandbyPool(config.standby_workers)
    events = EventBus()
    registry = Registry(config, host, socket_dir, monitor, events, on_change, standby)
    request_metrics, metrics_server = None, None
    if config.metrics_address:
        request_metrics, metrics_server = serve_metrics(config.metrics_address, lambda: list(registry.models.values()),
                                                        monitor)
        log.info("metrics_listening", address=config.metrics_address)
    reloader = Reloader(registry, reread or (lambda: config), config_path, notifier,
                        status=lambda: status_line(registry, time.monotonic()), auth=auth)
    service = SupervisorService(registry, metrics=request_metrics, reloader=reloader)
    supervisor_pb2_grpc.add_SupervisorServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)

    path = listen(server, config)
    http = None
    if config.http_address:  # the same request path as the gRPC service, on this loop
        http = HttpApi(config, lambda: auth.tokens,
                       [*OpenAI(service.inference).routes(), *Ollama(service.inference).routes()])
        log.info("http_listening", address=await http.start(), tls=config.http_tls,
                 cors_origins=list(config.cors_origins), tokens=auth.tokens.required)
    probes = None
    if config.health_address:
        probes = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)  # the same answers, no API
        host_, port = split_host_port(config.health_address)
        if probes.add_insecure_port(f"{host_}:{port}") == 0:
            raise ConfigError(f"cannot listen on health_address {config.health_address}")
        await probes.start()
    await health_servicer.set("", not_serving)
    await health_servicer.set(LIVENESS_SERVICE, serving)  # loading models is life too: startupProbe waits for ""
    await server.start()
    if path is not None:
        os.chmod(path, 0o660)
        if config.socket_group:
            os.chown(path, -1, grp.getgrnam(config.socket_group).gr_gid)
    log.info("listening", address=config.address, pid=os.getpid(), tls=config.tls_cert is not None,
             mutual_tls=config.tls_client_ca is not None, tokens=auth.tokens.required)

    async def load(model) -> None:
        try:
            await registry.load(model, source="config", keep_on_failure=True)
            log.info("model_loaded", model=model.name, source="config")
        except ApiError as e:
            log.error("model_load_failed", model=model.name, reason=e.message)

    # A stop (SIGTERM) during the start-up loads is obeyed at once, not after loads of minutes.
    async def load_all() -> None:
        await asyncio.gather(*(load(m) for m in config.models))
        await registry.restore()  # after the config's: a name the config now has is the config's

    loading = asyncio.ensure_future(load_all())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    loops: list[asyncio.Task] = []
    if not stop.is_set():
        await health_servicer.set("", serving)
        await health_servicer.set(SERVICE_NAME, serving)
        log.info("ready", models=len(registry.models))
        notifier.ready(status_line(registry, time.monotonic()))
        standby.refill()  # after the start-up loads, which it would only have slowed
        passes.completed(time.monotonic())
        loops = [asyncio.create_task(watch(registry, monitor, notifier, passes), name="watch"),
                 asyncio.create_task(report_liveness(passes, lambda: registry.config.poll_interval, on_liveness,
                                                     time.monotonic), name="liveness"),
                 asyncio.create_task(reload_on(hangup, reloader), name="sighup")]
        for task in loops:
            task.add_done_callback(loop_ended)
    await stop.wait()
    for task in loops:
        task.remove_done_callback(loop_ended)
        task.cancel()
    drain = registry.config.shutdown_timeout
    log.info("stopping", drain_s=drain, delay_s=registry.config.shutdown_delay)
    notifier.stopping()
    # NOT_SERVING first, while calls are still taken: balancers checking health move away before a call
    # could be refused (shutdown_delay: as long as they take to notice).
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(registry.config.shutdown_delay)
    events.followers.close()  # followers' streams end now, rather than hold the drain open
    # New calls are refused from now on. Those queued or in flight get shutdown_timeout to finish; then
    # they fail with UNAVAILABLE saying why. The server's own grace is longer, so that is what they read.
    server_stopped = asyncio.create_task(server.stop(drain + 10))
    http_stopped = asyncio.create_task(http.stop()) if http is not None else None
    await asyncio.sleep(0)  # let the stop begin: from here no new call is taken
    log.info("draining", models=len(registry.models), queued=sum(rt.waiting for rt in registry.models.values()))
    await asyncio.gather(registry.stop_all(reason=f"was stopped: llm-supervisord is shutting down and "
                                                  f"shutdown_timeout ({drain:g} s) has passed"),
                         standby.close())
    await server_stopped
    if http_stopped is not None:
        await http_stopped
    if probes is not None:
        await probes.stop(0)
    await asyncio.gather(loading, return_exceptions=True)
    if metrics_server is not None:
        metrics_server.shutdown()
    shutil.rmtree(socket_dir, ignore_errors=True)
    if path is not None:
        path.unlink(missing_ok=True)
    log.info("stopped")
    return 0


async def reload_on(hangup: asyncio.Event, reloader: Reloader) -> None:
    """SIGHUP: reload as `llmctl update` does; signals that come during a reload make one more."""
    while True:
        await hangup.wait()
        hangup.clear()
        try:
            await reloader.reload(dry_run=False)
        except ConfigError as e:
            log.error("reload_refused", reason=str(e), kept="the running config")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-supervisord", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="TOML config file (default: the embedded demo config)")
    parser.add_argument("--address", help="listen here instead of the config's address: unix:///path or host:port")
    parser.add_argument("--http-address", help="serve the OpenAI- and Ollama-compatible HTTP API here (host:port) "
                                               "instead of the config's [http] address; '' serves none")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--check-build", action="store_true",
                        help="check that this machine runs this llama.cpp build (quantized models included), then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    forbid_ptrace()  # first: no worker (same user) may read our memory or environment, or copy our API socket
    args = parse_args(argv)
    if args.check_build:
        from supervisor.process.buildcheck import main as check_build

        return check_build([])
    host = Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env=os.environ)
    configure("info")

    def read_config() -> SupervisorConfig:
        """The file (or the embedded default) with the command line's overrides, at start and each reload."""
        config = load_config(args.config, host)
        if args.address:
            config = dataclasses.replace(config, address=args.address)
        if args.log_level:
            config = dataclasses.replace(config, log_level=args.log_level)
        if args.http_address is not None:
            if args.http_address:
                try:
                    split_host_port(args.http_address, any_port=True)
                except ValueError:
                    raise ConfigError(f"--http-address must be host:port, got {args.http_address!r}") from None
            config = dataclasses.replace(config, http_address=args.http_address)
        return config

    try:
        config = read_config()
        configure(config.log_level, journald=config.journald)
        if args.config is None:
            ensure_demo_model(config)
    except ConfigError as e:
        print(f"llm-supervisord: {e}", file=sys.stderr)
        return 2

    async def run() -> int:
        stop, hangup = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        # Handlers only set the events: no logging or work inside a signal handler.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        return await serve(config, host, stop, reread=read_config, hangup=hangup,
                           config_path=str(args.config.resolve()) if args.config else "")

    try:
        return asyncio.run(run())
    except ConfigError as e:
        print(f"llm-supervisord: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
