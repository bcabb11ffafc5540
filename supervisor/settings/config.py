"""The TOML config as typed, frozen objects. Parsing is pure: host facts come in as arguments."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from supervisor.settings.units import parse_duration, parse_size

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
DEFAULT_ENGINE = "worker.engine:LlamaEngine"


class ConfigError(ValueError):
    """A config value an operator must fix; the message names the key and what is allowed."""


MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
MAX_STOP_SEQUENCES, MAX_STOP_LENGTH = 16, 256  # a model's stop words, and a request's


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    # llama.cpp's own names.
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0  # 0 = the cores the worker may run on (sched_getaffinity)
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    # Requests a worker generates at once, each a sequence in its one KV pool of n_ctx cells (llama-server's
    # --parallel; unlike Ollama's OLLAMA_NUM_PARALLEL it does not multiply the context).
    parallel: int = 4
    # Supervision.
    replicas: int = 1  # worker processes serving the model; mmap'd weights are shared between them
    pinned: bool = False
    keep_alive: float = 300.0  # seconds after the last request; inf = never; 0 = right after each
    # Memory lines: None (unset) = derived from the worker's estimate, 0 ("none") = off (memory_lines.py).
    max_private_memory: int | None = None  # soft line: graceful recycle (watchdog)
    max_gpu_memory: int | None = None
    leak_threshold: int | None = None
    max_requests: int = 0  # 0 = no limit
    max_requests_jitter: int = 0  # up to this many more, drawn once per worker
    hard_memory_factor: float = 1.5  # the hard line on memory is this × the soft one
    max_restarts: int = 5  # fast failures in a row before the model is FATAL
    request_timeout: float = 600.0
    heartbeat_timeout: float = 60.0  # a busy worker with no token or prompt batch for this long is hung
    max_queue: int = 64
    max_tokens: int = 0  # cap on a request's max_tokens; 0 = no cap beyond the context
    max_prompt_tokens: int = 0  # cap on a request's prompt (a chat's history is fitted to it); 0 = the context
    max_history_messages: int = 0  # Chat: the newest this many non-system messages are kept; 0 = all that fit
    strip_thinking: bool = True  # Chat: earlier assistant turns lose their <think>…</think> reasoning
    rlimit_data: int | None = None  # kernel's last line on the data segment (RLIMIT_DATA)
    rlimit_nofile: int = 1024
    load_timeout: float = 120.0
    # °C of a GPU the model's worker runs on; 0 turns a line off. Entered at the line, left `hysteresis` below.
    temperature_throttle: float = 85.0  # no new request goes to the GPU's workers until it cools
    temperature_critical: float = 92.0  # the workers drain and unload until it cools
    temperature_hysteresis: float = 5.0
    stream_interval: float = 0.05  # a stream message at most this often; tokens in between coalesce
    engine: str = DEFAULT_ENGINE
    # The worker computes embeddings (pooled as the GGUF says, else by mean) instead of generating text.
    embedding: bool = False
    # Request defaults, for what a request leaves unset (an Ollama store's params and system layers):
    system: str = ""  # Chat: the system message when a request does not open with one
    stop: tuple[str, ...] = ()  # stop sequences when a request gives none
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None

    def worker_options(self) -> dict[str, Any]:
        """What the worker process needs to load the model (it knows nothing of policies)."""
        keys = ("n_ctx", "n_batch", "n_threads", "n_gpu_layers", "use_mmap", "use_mlock", "flash_attn", "type_k", "type_v",
                "parallel", "embedding")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class SupervisorConfig:
    address: str
    state_dir: Path
    runtime_dir: Path
    model_dirs: tuple[Path, ...]
    poll_interval: float = 1.0
    memory_budget: int | None = None
    gpu_memory_budget: int | None = None
    gpu_memory_budget_percent: float | None = None  # "90%": of the GPUs' total memory, as NVML reports it
    max_loaded_models: int = 0  # 0 = no limit
    shutdown_timeout: float = 30.0
    shutdown_delay: float = 0.0  # on SIGTERM: NOT_SERVING at once, new calls still taken this long
    standby_workers: int = 1  # spare processes with the runtime imported, taken by the next worker start
    load_on_demand: bool = True  # a request for a model on disk that is not loaded loads it (catalog/)
    log_level: str = "info"
    journald: bool = False
    metrics_address: str = ""
    # A second, plaintext listener with only grpc.health.v1: kubelet's gRPC probes cannot speak TLS.
    health_address: str = ""
    # Who may connect (see supervisor/server/security.py). TCP needs TLS unless insecure is written out.
    insecure: bool = False
    socket_group: str = ""  # the unix socket's group (mode 0660): its members may connect
    max_message_size: int = 4 << 20  # largest request a client may send
    max_concurrent_streams: int = 100  # per connection
    max_followers: int = 64  # WatchEvents and TailModel --follow streams at once, all clients together
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)
    inference_tokens_file: Path | None = None
    admin_tokens_file: Path | None = None
    # The OpenAI- and Ollama-compatible HTTP API (supervisor/http/): "" = off.
    http_address: str = ""
    http_tls: bool = False  # with the [tls] files; on whenever [tls] is given, unless [http] tls = false
    http_insecure: bool = False  # plaintext off loopback, written out as for gRPC
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call it; "*" = any
    defaults: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()


@dataclass(frozen=True)
class Host:
    """Facts about the machine that parsing needs: percentages, default paths."""

    memory_bytes: int
    is_root: bool
    env: Mapping[str, str]


def default_dirs(host: Host) -> tuple[Path, Path]:
    """(state_dir, runtime_dir): systemd's directories when it gave them, FHS ones as root, XDG otherwise."""
    env = host.env
    if env.get("STATE_DIRECTORY") and env.get("RUNTIME_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]), Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if host.is_root:
        return Path("/var/lib/llm-supervisor"), Path("/run/llm-supervisor")
    home = Path(env.get("HOME", "/tmp"))
    state = Path(env.get("XDG_STATE_HOME", home / ".local/state")) / "llm-supervisor"
    runtime = Path(env.get("XDG_RUNTIME_DIR", f"/tmp/llm-supervisor-{os.getuid()}")) / "llm-supervisor"
    return state, runtime


def default_address(host: Host) -> str:
    return f"unix://{default_dirs(host)[1] / 'supervisor.sock'}"


def _coerce(key: str, kind: Any, value: Any, host: Host) -> Any:
    """One key's value, from TOML (typed) or from a LoadModel option (always a string)."""
    if key in ("max_private_memory", "max_gpu_memory", "leak_threshold", "rlimit_data"):
        # Unset: derived from the worker's estimate (memory_lines.py); "none": off on purpose (0).
        if value in ("", None):
            return None
        return 0 if str(value).strip().lower() == "none" else parse_size(value, host.memory_bytes)
    if key == "keep_alive":
        return parse_duration(value, allow_forever=True)
    if key == "stop":  # a TOML list, or a LoadModel option's JSON list
        stops = value
        if isinstance(value, str) and value.lstrip().startswith("["):  # a JSON list, or a word like "[INST]"
            try:
                stops = json.loads(value)
            except ValueError:
                pass
            stops = stops if isinstance(stops, list) else value
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
            raise ValueError(f"expected a list of non-empty strings, got {value!r}")
        return tuple(stops)
    if key in ("request_timeout", "load_timeout", "stream_interval", "heartbeat_timeout"):
        return parse_duration(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if not isinstance(value, str):  # TOML's list or number is no prompt or path to stringify
        raise ValueError(f"expected a string, got {value!r}")
    return value


_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name != "name"}
_MODEL_TYPES = {"int": int, "bool": bool, "str": str, "float": float}


def model_config(name: str, values: Mapping[str, Any], defaults: Mapping[str, Any], host: Host) -> ModelConfig:
    """A model's config: [defaults] overlaid by its own table (or by LoadModel's options)."""
    if (not name or not all(c.isalnum() or c in "-_.:/" for c in name) or len(name) > 64
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ConfigError(f"model name {name!r} is not allowed: use 1-64 letters, digits, '-', '_', '.', ':' or "
                          f"'/' between parts (an Ollama store's namespace/name:tag), none of them empty, '.' or '..'")
    merged = {**defaults, **values}
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        f = _MODEL_FIELDS.get(key)
        if f is None:
            raise ConfigError(f"model {name!r}: unknown option {key!r}; known: {', '.join(sorted(_MODEL_FIELDS))}")
        kind = _MODEL_TYPES.get(str(f.type).split(" ")[0], str)
        try:
            kwargs[key] = _coerce(key, kind, value, host)
        except ValueError as e:
            raise ConfigError(f"model {name!r}: option {key}: {e}") from None
    if not kwargs.get("path"):
        raise ConfigError(f"model {name!r}: 'path' is required (a GGUF file inside a model directory)")
    if "n_batch" not in kwargs and "n_ctx" in kwargs:
        kwargs["n_batch"] = min(ModelConfig.n_batch, kwargs["n_ctx"])  # a small context needs no bigger batch
    cfg = ModelConfig(name=name, **kwargs)
    _check_model(cfg)
    return cfg


def _check_model(cfg: ModelConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"model {cfg.name!r}: {message}")

    need(16 <= cfg.n_ctx <= 1 << 20, f"n_ctx must be between 16 and 1048576, got {cfg.n_ctx}")
    need(1 <= cfg.n_batch <= cfg.n_ctx, f"n_batch must be between 1 and n_ctx ({cfg.n_ctx}), got {cfg.n_batch}")
    need(0 <= cfg.n_threads <= 1024, f"n_threads must be between 0 (auto) and 1024, got {cfg.n_threads}")
    need(cfg.n_gpu_layers >= -1, f"n_gpu_layers must be -1 (all) or more, got {cfg.n_gpu_layers}")
    for key in ("type_k", "type_v"):
        need(getattr(cfg, key) in KV_TYPES, f"{key} must be one of {', '.join(KV_TYPES)}, got {getattr(cfg, key)!r}")
    need(1 <= cfg.parallel <= min(MAX_PARALLEL, cfg.n_batch),
         f"parallel must be between 1 and {min(MAX_PARALLEL, cfg.n_batch)} (at most n_batch, since every "
         f"generating sequence puts a token in each batch, and llama.cpp's {MAX_PARALLEL} sequences), got {cfg.parallel}")
    need(1 <= cfg.replicas <= 16, f"replicas must be between 1 and 16, got {cfg.replicas}")
    need(cfg.max_queue >= 0, f"max_queue must be 0 or more, got {cfg.max_queue}")
    need(cfg.max_tokens >= 0, f"max_tokens must be 0 (no cap) or more, got {cfg.max_tokens}")
    need(cfg.max_prompt_tokens >= 0, f"max_prompt_tokens must be 0 (no cap) or more, got {cfg.max_prompt_tokens}")
    need(cfg.max_history_messages >= 0, f"max_history_messages must be 0 (no limit) or more, got {cfg.max_history_messages}")
    need(cfg.max_requests >= 0, f"max_requests must be 0 (no limit) or more, got {cfg.max_requests}")
    need(cfg.max_requests_jitter >= 0, f"max_requests_jitter must be 0 or more, got {cfg.max_requests_jitter}")
    need(cfg.hard_memory_factor >= 1.0, f"hard_memory_factor must be 1 or more, got {cfg.hard_memory_factor:g}")
    need(cfg.max_restarts >= 0, f"max_restarts must be 0 or more, got {cfg.max_restarts}")
    need(cfg.request_timeout > 0, "request_timeout must be more than 0")
    need(cfg.load_timeout > 0, "load_timeout must be more than 0")
    need(cfg.heartbeat_timeout > 0, "heartbeat_timeout must be more than 0")
    need(cfg.stream_interval <= 1.0, f"stream_interval above 1s makes streaming pointless, got {cfg.stream_interval:g} s")
    for key in ("temperature_throttle", "temperature_critical"):
        need(0 <= getattr(cfg, key) <= 150, f"{key} must be between 0 (off) and 150 °C, got {getattr(cfg, key):g}")
    need(not (cfg.temperature_throttle and cfg.temperature_critical) or cfg.temperature_critical > cfg.temperature_throttle,
         f"temperature_critical ({cfg.temperature_critical:g}) must be above temperature_throttle ({cfg.temperature_throttle:g})")
    need(0 < cfg.temperature_hysteresis <= 30, f"temperature_hysteresis must be above 0 and at most 30 °C, got {cfg.temperature_hysteresis:g}")
    need(cfg.rlimit_nofile >= 64, f"rlimit_nofile must be at least 64, got {cfg.rlimit_nofile}")
    need(len(cfg.stop) <= MAX_STOP_SEQUENCES and all(len(stop) <= MAX_STOP_LENGTH for stop in cfg.stop),
         f"stop holds at most {MAX_STOP_SEQUENCES} sequences of at most {MAX_STOP_LENGTH} characters")
    for key, low, high in (("temperature", 0, 100), ("top_p", 0, 1), ("min_p", 0, 1), ("repeat_penalty", 0.01, 100),
                           ("top_k", 0, 1_000_000)):
        value = getattr(cfg, key)
        need(value is None or low <= value <= high, f"{key} must be between {low:g} and {high:g}, got {value}")
    need(not cfg.rlimit_data or cfg.rlimit_data >= 64 << 20, "rlimit_data below 64MiB cannot even load the runtime")
    need(":" in cfg.engine, f"engine must be 'module:Class', got {cfg.engine!r}")


_SUPERVISOR_KEYS = {"address", "state_dir", "runtime_dir", "model_dirs", "poll_interval", "memory_budget",
                    "gpu_memory_budget", "max_loaded_models", "shutdown_timeout", "standby_workers", "insecure",
                    "socket_group", "max_message_size", "max_concurrent_streams", "shutdown_delay", "health_address",
                    "max_followers", "load_on_demand"}
_SECTION_KEYS = {"logging": {"level", "journald"}, "metrics": {"address"}, "tls": {"cert", "key", "client_ca"},
                 "auth": {"inference_tokens_file", "admin_tokens_file"},
                 "http": {"address", "tls", "insecure", "cors_origins"}}


def parse_config(text: str, host: Host, base_dir: Path | None = None) -> SupervisorConfig:
    """Parse a TOML config. Relative directories are relative to the config file's directory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config is not valid TOML: {e}") from None
    unknown = set(data) - {"supervisor", "defaults", "models", *_SECTION_KEYS}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    for section, known in _SECTION_KEYS.items():
        bad = set(data.get(section, {})) - known
        if bad:
            raise ConfigError(f"[{section}]: unknown key(s) {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
    tls, auth, http = data.get("tls", {}), data.get("auth", {}), data.get("http", {})
    sup = dict(data.get("supervisor", {}))
    bad = set(sup) - _SUPERVISOR_KEYS
    if bad:
        raise ConfigError(f"[supervisor]: unknown key(s) {', '.join(sorted(bad))}; known: {', '.join(sorted(_SUPERVISOR_KEYS))}")
    base = base_dir or Path.cwd()
    state_default, runtime_default = default_dirs(host)

    def directory(value: Any) -> Path:
        return (base / str(value)).resolve()

    state_dir = directory(sup["state_dir"]) if "state_dir" in sup else state_default
    runtime_dir = directory(sup["runtime_dir"]) if "runtime_dir" in sup else runtime_default
    model_dirs = sup.get("model_dirs", [str(state_dir / "models")])
    if isinstance(model_dirs, str) or not all(isinstance(d, str) for d in model_dirs):
        raise ConfigError("[supervisor] model_dirs must be a list of directory paths")
    try:
        cfg = SupervisorConfig(
            address=str(sup.get("address", f"unix://{runtime_dir / 'supervisor.sock'}")),
            state_dir=state_dir,
            runtime_dir=runtime_dir,
            model_dirs=tuple(directory(d) for d in model_dirs),
            poll_interval=parse_duration(sup.get("poll_interval", 1.0)),
            memory_budget=parse_size(sup["memory_budget"], host.memory_bytes) if "memory_budget" in sup else None,
            gpu_memory_budget=(parse_size(sup["gpu_memory_budget"], None)
                               if "gpu_memory_budget" in sup and not is_percent(sup["gpu_memory_budget"]) else None),
            gpu_memory_budget_percent=(parse_size(sup["gpu_memory_budget"], 10**9) / 10**7
                                       if is_percent(sup.get("gpu_memory_budget")) else None),
            max_loaded_models=int(sup.get("max_loaded_models", 0)),
            shutdown_timeout=parse_duration(sup.get("shutdown_timeout", 30.0)),
            shutdown_delay=parse_duration(sup.get("shutdown_delay", 0.0)),
            standby_workers=int(sup.get("standby_workers", 1)),
            load_on_demand=sup.get("load_on_demand", True),
            log_level=str(data.get("logging", {}).get("level", "info")).lower(),
            journald=data.get("logging", {}).get("journald", False),
            metrics_address=str(data.get("metrics", {}).get("address", "")),
            insecure=sup.get("insecure", False),
            health_address=str(sup.get("health_address", "")),
            socket_group=str(sup.get("socket_group", "")),
            max_message_size=parse_size(sup.get("max_message_size", "4MiB")),
            max_concurrent_streams=int(sup.get("max_concurrent_streams", 100)),
            max_followers=int(sup.get("max_followers", 64)),
            tls_cert=directory(tls["cert"]) if "cert" in tls else None,
            tls_key=directory(tls["key"]) if "key" in tls else None,
            tls_client_ca=directory(tls["client_ca"]) if "client_ca" in tls else None,
            inference_tokens_file=directory(auth["inference_tokens_file"]) if "inference_tokens_file" in auth else None,
            admin_tokens_file=directory(auth["admin_tokens_file"]) if "admin_tokens_file" in auth else None,
            http_address=str(http.get("address", "")),
            http_tls=http.get("tls", "cert" in tls),
            http_insecure=http.get("insecure", False),
            cors_origins=tuple(http.get("cors_origins", ())),
            defaults=dict(data.get("defaults", {})),
        )
    except (ValueError, TypeError) as e:  # TypeError: a table or list where a number belongs
        raise ConfigError(f"[supervisor]: {e}") from None
    if cfg.poll_interval <= 0 or not math.isfinite(cfg.poll_interval):
        raise ConfigError("[supervisor] poll_interval must be more than 0")
    if not 0 <= cfg.standby_workers <= 8:
        raise ConfigError(f"[supervisor] standby_workers must be between 0 (none) and 8, got {cfg.standby_workers}")
    for key, value in (("[metrics] address", cfg.metrics_address), ("[supervisor] health_address", cfg.health_address),
                       ("[http] address", cfg.http_address)):
        try:
            if value:
                split_host_port(value, any_port=key == "[http] address")
        except ValueError:
            raise ConfigError(f"{key} must be host:port (or :port for every interface), got {value!r}") from None
    for key, value in (("[supervisor] insecure", cfg.insecure), ("[http] insecure", cfg.http_insecure),
                       ("[supervisor] load_on_demand", cfg.load_on_demand),
                       ("[http] tls", cfg.http_tls)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    if cfg.http_tls and cfg.tls_cert is None:
        raise ConfigError("[http] tls = true needs [tls] cert and key")
    if not all(isinstance(o, str) and o for o in cfg.cors_origins) or isinstance(http.get("cors_origins", ()), str):
        raise ConfigError('[http] cors_origins must be a list of origins, e.g. ["https://chat.example.com"] or ["*"]')
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("[tls] needs both cert and key")
    if cfg.tls_client_ca is not None and cfg.tls_cert is None:
        raise ConfigError("[tls] client_ca needs cert and key too: mutual TLS is TLS first")
    if not 1 << 10 <= cfg.max_message_size <= 1 << 30:
        raise ConfigError(f"[supervisor] max_message_size must be between 1KiB and 1GiB, got {cfg.max_message_size}")
    if not 1 <= cfg.max_concurrent_streams <= 10_000:
        raise ConfigError(f"[supervisor] max_concurrent_streams must be between 1 and 10000, got {cfg.max_concurrent_streams}")
    if not 1 <= cfg.max_followers <= 10_000:
        raise ConfigError(f"[supervisor] max_followers must be between 1 and 10000, got {cfg.max_followers}")
    if not isinstance(cfg.journald, bool):
        raise ConfigError(f"[logging] journald must be true or false, got {cfg.journald!r}")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"[logging] level must be debug, info, warning or error, got {cfg.log_level!r}")
    models_table = data.get("models", {})
    models = tuple(model_config(name, dict(values), cfg.defaults, host) for name, values in models_table.items())
    return dataclasses.replace(cfg, models=models)


def is_percent(value: Any) -> bool:
    return isinstance(value, str) and value.strip().endswith("%")


def split_host_port(address: str, any_port: bool = False) -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" (every interface) → (host, port); ValueError otherwise.
    With any_port, port 0 (the kernel picks a free one) is allowed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_config(path: Path | None, host: Host) -> SupervisorConfig:
    """The config file, or the embedded default (serves the generated `demo` model) when there is none."""
    if path is None:
        return parse_config(EMBEDDED_DEFAULT, host)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, host, base_dir=path.parent)


EMBEDDED_DEFAULT = """
# llm-supervisor's embedded default: one tiny generated model, so the whole path can be seen working.
[supervisor]
poll_interval = "1s"

[http]
address = "127.0.0.1:11434"   # Ollama's port: Ollama's and OpenAI's clients find it with no setting

[defaults]
n_ctx = 2048
keep_alive = "-1"

[models.demo]
path = "demo.gguf"   # generated into <state_dir>/models on first start
"""
