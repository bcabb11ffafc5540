"""Decisions from samples: pure functions of measurements and config — no I/O, no clock reads.

The monitor measures, these decide, the model runtime acts. Every decision carries its reason in words
an operator can act on and the figures behind it, because "recycled" alone explains nothing.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MiB = 1 << 20


class Action(enum.IntEnum):
    # Ordered by severity: when several rules fire in one tick, the most severe one is the decision.
    NONE = 0
    RECYCLE = 1  # graceful: finish the current request, then replace the worker
    KILL = 2     # at once: the request in flight fails with the reason


@dataclass(frozen=True)
class Sample:
    """One measurement of a worker, from outside it."""

    at: float                # monotonic seconds
    private: int             # RssAnon + swap, bytes
    file_rss: int            # mmap'd weights in the page cache, bytes (never a leak)
    gpu: int | None = None   # NVML per-process GPU memory; None when there is no GPU
    requests: int = 0        # requests the worker had served when sampled
    cpu_s: float | None = None  # user + system CPU seconds so far
    data: int | None = None  # VmData, bytes: what RLIMIT_DATA counts (virtual: reserved, touched or not)
    context: int = 0  # the most tokens the worker has held in its context so far (its high-water mark)


@dataclass(frozen=True)
class Limits:
    max_private_memory: int | None = None
    max_gpu_memory: int | None = None
    leak_threshold: int | None = None
    hard_factor: float = 1.5          # the hard line is this many times the soft one
    rlimit_data: int | None = None    # the kernel's line: act before the worker's malloc starts failing
    max_requests: int = 0             # with this worker's jitter already added; 0 = no limit
    soft_samples: int = 2             # consecutive samples above a soft line before a recycle
    leak_min_requests: int = 8        # per-request samples before a trend is believed
    leak_min_fit: float = 0.8         # r² of the trend: steady growth, not noise or one step
    # Private memory a fuller context explains (compute buffers touched further), per token of context
    # beyond the warm-up's: not a leak (supervisor/decide/memory_lines.py).
    context_growth: float = 0.0
    warm_context: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    figures: dict = field(default_factory=dict)
    rule: str = ""  # which rule decided: "memory", "leak", "max_requests" (a metrics label)

    def __bool__(self) -> bool:
        return self.action != Action.NONE


NOTHING = Decision(Action.NONE)


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


RLIMIT_MARGIN = 0.95  # of rlimit_data: where the supervisor acts before the worker's allocations fail


def hard_line(soft: int | None, limits: Limits) -> int | None:
    """Where the supervisor stops waiting for a request boundary: well above the soft line."""
    return int(soft * limits.hard_factor) if soft else None


def rlimit_decision(latest: Sample, limits: Limits) -> Decision:
    """RLIMIT_DATA limits the virtual size of the data segment (VmData), not resident memory: glibc's
    arenas reserve address space they never touch, so allocations fail while RSS is far below the limit.
    Compared like with like, a worker this close to it is about to fail mid-request: replace it now."""
    if not limits.rlimit_data or latest.data is None:
        return NOTHING
    line = int(limits.rlimit_data * RLIMIT_MARGIN)
    if latest.data < line:
        return NOTHING
    return Decision(Action.KILL, f"data segment (VmData) {mib(latest.data)} is past {RLIMIT_MARGIN:.0%} of "
                                 f"rlimit_data ({mib(limits.rlimit_data)}): its allocations are about to fail",
                    {"bytes": latest.data, "limit_bytes": limits.rlimit_data, "key": "rlimit_data"}, rule="memory")


def memory_decision(history: Sequence[Sample], limits: Limits, baseline: Sample | None = None) -> Decision:
    """Soft lines recycle after `soft_samples` samples in a row above them; hard lines kill at once. A soft
    line the worker's own baseline (right after its warm-up) is already above is no reason to recycle:
    every replacement would start above it too, and recycle forever."""
    if not history:
        return NOTHING
    latest = history[-1]
    if killed := rlimit_decision(latest, limits):
        return killed
    checks = [("private memory", "max_private_memory", limits.max_private_memory, lambda s: s.private)]
    if latest.gpu is not None:
        checks.append(("GPU memory", "max_gpu_memory", limits.max_gpu_memory, lambda s: s.gpu or 0))
    decision = NOTHING
    for what, key, soft, value in checks:
        hard = hard_line(soft, limits)
        now = value(latest)
        if hard and now >= hard:
            return Decision(Action.KILL, f"{what} {mib(now)} is above the hard line {mib(hard)}",
                            {"bytes": now, "limit_bytes": hard, "key": key}, rule="memory")
        recent = history[-limits.soft_samples:]
        if soft and baseline is not None and value(baseline) >= soft:
            continue
        if soft and len(recent) == limits.soft_samples and all(value(s) > soft for s in recent):
            decision = Decision(Action.RECYCLE, f"{what} {mib(now)} is above {key} ({mib(soft)})",
                                {"bytes": now, "limit_bytes": soft, "key": key}, rule="memory")
    return decision


def trend(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of y over x, and r² of the fit (0 when y does not vary)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    syy = sum((y - my) ** 2 for _, y in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    if sxx == 0 or syy == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    return slope, (sxy * sxy) / (sxx * syy)


def leak_decision(per_request: Sequence[Sample], baseline: int, limits: Limits, metric: str = "private") -> Decision:
    """Growth of private (or GPU) memory over the baseline taken after the worker's warm-up.

    Sampled after each request, so a steady per-request growth is seen as a trend long before it reaches a
    line: recycle when the trend (r² ≥ leak_min_fit) would cross leak_threshold within as many requests
    again as it has been watched, or when the growth, read as the median of the last three samples (one
    spike is not a leak), already has.
    """
    threshold = limits.leak_threshold
    if metric == "gpu":  # samples from before NVML listed the worker say nothing about its GPU memory
        per_request = [s for s in per_request if s.gpu is not None]
    if not threshold or not per_request:
        return NOTHING

    def value(s: Sample) -> float:
        if metric == "gpu":  # allocated whole at load: GPU memory does not grow with the context
            return s.gpu or 0
        # Growth the context explains is taken out: a chat filling n_ctx turn by turn, or a run of long
        # prompts, touches more of the compute buffers each time, and that is no leak.
        return s.private - limits.context_growth * max(0, s.context - limits.warm_context)

    what = "private memory" if metric == "private" else "GPU memory"
    recent = sorted(value(s) for s in per_request[-3:])
    growth = recent[len(recent) // 2] - baseline
    if len(per_request) >= 3 and growth > threshold:
        return Decision(Action.RECYCLE, f"{what} grew {mib(growth)} over its baseline, above leak_threshold ({mib(threshold)})",
                        {"growth_bytes": growth, "limit_bytes": threshold}, rule="leak")
    if len(per_request) < limits.leak_min_requests:
        return NOTHING
    window = per_request[-64:]
    slope, fit = trend([(s.requests, value(s)) for s in window])
    span = window[-1].requests - window[0].requests
    if slope > 0 and fit >= limits.leak_min_fit and growth + slope * span > threshold:
        return Decision(Action.RECYCLE,
                        f"{what} leak: +{slope / MiB:.1f} MiB/request over {span} requests "
                        f"(grown {mib(growth)}, leak_threshold {mib(threshold)})",
                        {"bytes_per_request": int(slope), "requests": span, "growth_bytes": growth, "fit": round(fit, 3)},
                        rule="leak")
    return NOTHING


def requests_decision(served: int, limits: Limits) -> Decision:
    if limits.max_requests and served >= limits.max_requests:
        return Decision(Action.RECYCLE, f"served {served} requests (max_requests with this worker's jitter: {limits.max_requests})",
                        {"requests": served}, rule="max_requests")
    return NOTHING


def draw_max_requests(max_requests: int, jitter: int, rng: random.Random) -> int:
    """gunicorn's idea: drawn once per worker, so replicas started together do not recycle together."""
    if not max_requests:
        return 0
    return max_requests + (rng.randint(0, jitter) if jitter > 0 else 0)


def decide(history: Sequence[Sample], per_request: Sequence[Sample], baseline: Sample | None, limits: Limits) -> Decision:
    """One decision per worker per tick: the most severe of what the rules say."""
    history, per_request = list(history), list(per_request)  # the monitor keeps deques; rules slice
    candidates = [memory_decision(history, limits, baseline)]
    if baseline is not None:
        candidates.append(leak_decision(per_request, baseline.private, limits, "private"))
        if baseline.gpu is not None:
            candidates.append(leak_decision(per_request, baseline.gpu, limits, "gpu"))
    if per_request:
        candidates.append(requests_decision(per_request[-1].requests, limits))
    return max(candidates, key=lambda d: d.action)


def restart_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential back-off before restarting a model whose workers keep dying: 1, 2, 4 … 60 s."""
    return 0.0 if failures <= 0 else min(cap, base * 2 ** (failures - 1))


def keep_alive_expired(last_used: float, now: float, keep_alive: float, load: int) -> bool:
    """Ollama's keep_alive: unload `keep_alive` seconds after the last request ended; 0 = right after it;
    inf (-1 in the config) = never. A model with a request running or waiting (`load`) is never idle,
    however long that request has run: the clock starts again when it ends."""
    return load == 0 and math.isfinite(keep_alive) and now - last_used >= keep_alive


def unload_in(last_used: float, now: float, keep_alive: float) -> float:
    """Seconds until an idle unload, like `ollama ps`'s UNTIL; -1 = never."""
    return -1.0 if not math.isfinite(keep_alive) else max(0.0, last_used + keep_alive - now)


def hung_for(last_beat: float | None, busy_since: float, now: float, timeout: float) -> float | None:
    """Seconds a busy worker has shown no progress, when that is past `timeout`; else None.

    Progress is the later of its last heartbeat and the start of the request (a beat from the previous
    request proves nothing about this one)."""
    last = max(last_beat or 0.0, busy_since)
    silent = now - last
    return silent if silent > timeout else None


def cpu_percent(history: Sequence[Sample]) -> float | None:
    """CPU use between the last two samples, in % of one core (200 = two cores busy)."""
    timed = [s for s in history if s.cpu_s is not None][-2:]
    if len(timed) < 2 or timed[1].at <= timed[0].at:
        return None
    return max(0.0, 100.0 * (timed[1].cpu_s - timed[0].cpu_s) / (timed[1].at - timed[0].at))


class Heat(enum.IntEnum):
    NORMAL = 0
    THROTTLE = 1  # no new request is admitted to the GPU's workers
    CRITICAL = 2  # its workers drain and unload


@dataclass(frozen=True)
class Thermal:
    throttle: float = 0.0    # °C; 0 = off
    critical: float = 0.0    # °C; 0 = off
    hysteresis: float = 5.0  # a level is left only this far below its line


def heat_level(previous: Heat, temperature: float, thermal: Thermal) -> Heat:
    """A level is entered at its line and left only `hysteresis` below it, so a GPU hovering at a line
    does not flap between admitting and refusing with every poll."""
    def holds(level: Heat, line: float) -> bool:
        return bool(line) and (temperature >= line or (previous >= level and temperature > line - thermal.hysteresis))

    if holds(Heat.CRITICAL, thermal.critical):
        return Heat.CRITICAL
    if holds(Heat.THROTTLE, thermal.throttle):
        return Heat.THROTTLE
    return Heat.NORMAL


@dataclass(frozen=True)
class Usage:
    """Memory the workers hold, or one worker needs: private bytes and GPU bytes."""

    private: int = 0
    gpu: int = 0


def total(usages: Iterable[Usage]) -> Usage:
    usages = list(usages)
    return Usage(sum(u.private for u in usages), sum(u.gpu for u in usages))


def replacement_first(budget: Usage, in_use: Usage, needed: Usage) -> tuple[bool, str]:
    """Whether a recycle may start the replacement while the old worker still holds its memory: only when
    the budgets (0 = none) hold both. Otherwise the old worker goes first and requests wait a little longer
    — better than the replacement's load failing, or the host swapping. Returns the answer and why not."""
    for what, limit, used, more in (("memory_budget", budget.private, in_use.private, needed.private),
                                    ("gpu_memory_budget", budget.gpu, in_use.gpu, needed.gpu)):
        if limit and used + more > limit:
            return False, f"{what} ({mib(limit)}) cannot hold both: {mib(used)} in use + {mib(more)} for the replacement"
    return True, ""


@dataclass(frozen=True)
class Resident:
    """A model's replica holding memory now (a worker running or starting), as admission sees it."""

    name: str         # the replica's label: "qwen", "qwen#2"
    usage: Usage
    last_used: float  # monotonic time of its last request
    pinned: bool
    idle: bool        # no request running or queued
    model: str = ""   # the model it serves, when its label is not the model's name

    @property
    def model_name(self) -> str:
        return self.model or self.name


@dataclass(frozen=True)
class Admission:
    evict: tuple[str, ...] = ()  # unload these first, in this order
    refused: str = ""            # why it cannot start even then; empty when it can


def over_limits(budget: Usage, max_models: int, held: Sequence[Resident], needed: Usage, model: str = "") -> list[str]:
    """The limits (0 = none) that `needed` (for `model`) beside `held` would break, by config key."""
    in_use = total(r.usage for r in held)
    broken = []
    if budget.private and in_use.private + needed.private > budget.private:
        broken.append("memory_budget")
    if budget.gpu and in_use.gpu + needed.gpu > budget.gpu:
        broken.append("gpu_memory_budget")
    if max_models and len({r.model_name for r in held} | {model}) > max_models:
        broken.append("max_loaded_models")
    return broken


def admission(needed: Usage, budget: Usage, max_models: int, residents: Sequence[Resident],
              model: str = "") -> Admission:
    """Whether a worker needing `needed` may start: idle models are evicted least recently used first,
    never pinned or busy ones, and only as many as it takes. When even evicting every candidate is not
    enough, nothing is evicted and the answer names the limits that stay broken."""
    held = list(residents)
    evict: list[str] = []
    for candidate in sorted((r for r in residents if r.idle and not r.pinned), key=lambda r: r.last_used):
        if not over_limits(budget, max_models, held, needed, model):
            break
        held.remove(candidate)
        evict.append(candidate.name)
    broken = over_limits(budget, max_models, held, needed, model)
    if broken:
        return Admission(refused=", ".join(broken))
    return Admission(evict=tuple(evict))
