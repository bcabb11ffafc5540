"""Each worker's memory lines: configured, or derived from its own estimate (pure).

Most people set no memory key at all; a worker with no line then grows until the host swaps or the OOM
killer picks a victim. So every line has a default derived from what the worker is expected to hold at
full context (supervisor/decide/estimate.py: weights on the host excluded while mmap'd), with headroom enough
that a healthy worker at full context never reaches it:

    max_private_memory (soft) = 1.5 × private at full context + 256 MiB
    hard line                 = soft × hard_memory_factor
    rlimit_data               = 2 × hard line + 1 GiB   (the kernel counts address space — glibc arenas,
                                                         thread stacks — not resident memory)
    leak_threshold            = max(64 MiB, 5% of private at full context)
    max_gpu_memory            = 1.5 × GPU memory at full context + 512 MiB, on a GPU

A configured value wins; "none" (0 here) turns a line off on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.settings.config import ModelConfig
from supervisor.decide.estimate import Estimate

MiB = 1 << 20
SOFT_FACTOR, SOFT_MARGIN = 1.5, 256 * MiB
RLIMIT_FACTOR, RLIMIT_MARGIN = 2, 1024 * MiB
LEAK_MIN, LEAK_FRACTION = 64 * MiB, 0.05
GPU_FACTOR, GPU_MARGIN = 1.5, 512 * MiB  # above the estimate's own tolerance on a GPU (±25%, unmeasured here)
# Growth of private memory that the context explains is forgiven up to this multiple of the estimate's.
CONTEXT_SLACK = 1.5

CONFIGURED, DERIVED, OFF = "configured", "derived", "off"


@dataclass(frozen=True)
class MemoryLines:
    """The lines one worker runs under (None: off), and where each came from."""

    max_private_memory: int | None
    hard_private_memory: int | None
    rlimit_data: int | None
    leak_threshold: int | None
    max_gpu_memory: int | None
    sources: tuple[tuple[str, str], ...]  # (key, CONFIGURED | DERIVED | OFF)
    # Private memory the context may add, per token of context beyond the warm-up's: forgiven by the
    # leak rule, so a conversation filling n_ctx is not taken for a leak.
    context_growth: float = 0.0
    warm_context: int = 0

    def source(self, key: str) -> str:
        return dict(self.sources)[key]


def _pick(configured: int | None, derived: int | None) -> tuple[int | None, str]:
    if configured is None:
        return derived, DERIVED if derived else OFF
    return (configured, CONFIGURED) if configured else (None, OFF)


def memory_lines(config: ModelConfig, figures: Estimate) -> MemoryLines:
    peak = figures.private_peak
    soft, soft_from = _pick(config.max_private_memory, int(SOFT_FACTOR * peak + SOFT_MARGIN))
    hard = int(soft * config.hard_memory_factor) if soft else None
    # Derived from the larger of the two hard lines: a configured soft line above the estimate must not
    # be undercut by the kernel's.
    derived_hard = int((SOFT_FACTOR * peak + SOFT_MARGIN) * config.hard_memory_factor)
    rlimit, rlimit_from = _pick(config.rlimit_data, RLIMIT_FACTOR * max(hard or 0, derived_hard) + RLIMIT_MARGIN)
    leak, leak_from = _pick(config.leak_threshold, max(LEAK_MIN, int(LEAK_FRACTION * peak)))
    gpu, gpu_from = _pick(config.max_gpu_memory, int(GPU_FACTOR * figures.gpu + GPU_MARGIN) if figures.gpu else None)
    warm = min(figures.n_ctx, config.n_batch)
    growth = (figures.private_peak - figures.private_at_load) / max(1, figures.n_ctx - warm)
    return MemoryLines(
        max_private_memory=soft, hard_private_memory=hard, rlimit_data=rlimit, leak_threshold=leak,
        max_gpu_memory=gpu,
        sources=(("max_private_memory", soft_from), ("rlimit_data", rlimit_from), ("leak_threshold", leak_from),
                 ("max_gpu_memory", gpu_from)),
        context_growth=CONTEXT_SLACK * max(0.0, growth), warm_context=warm,
    )
