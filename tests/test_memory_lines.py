"""Safe by default: every worker runs under memory lines derived from its own estimate, unless the config
sets them (or turns one off with "none"); the leak rule forgives the growth a fuller context explains."""

from __future__ import annotations

import pytest

from supervisor.settings.config import Host, model_config
from supervisor.settings.demo_model import ModelShape, write_model
from supervisor.decide.estimate import estimate
from supervisor.settings.gguf_file import read_gguf_info
from supervisor.decide.memory_lines import memory_lines
from supervisor.decide.policies import Action, Limits, MiB, Sample, leak_decision

HOST = Host(memory_bytes=64 << 30, is_root=False, env={})


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    return read_gguf_info(write_model(tmp_path_factory.mktemp("m") / "m.gguf", ModelShape(n_embd=256, n_ff=512))).shape


def lines_for(shape, **options):
    config = model_config("m", {"path": "m.gguf", **options}, {}, HOST)
    return config, estimate(shape, config), memory_lines(config, estimate(shape, config))


def test_with_no_memory_key_every_line_is_derived_from_the_estimate(shape):
    config, figures, lines = lines_for(shape, n_ctx="4096")
    peak = figures.private_peak
    assert lines.max_private_memory == int(1.5 * peak + 256 * MiB)
    assert lines.hard_private_memory == int(lines.max_private_memory * config.hard_memory_factor)
    assert lines.rlimit_data == 2 * lines.hard_private_memory + 1024 * MiB
    assert lines.leak_threshold == max(64 * MiB, int(0.05 * peak))
    assert lines.max_gpu_memory is None  # no GPU layers: no GPU line
    assert dict(lines.sources) == {"max_private_memory": "derived", "rlimit_data": "derived",
                                   "leak_threshold": "derived", "max_gpu_memory": "off"}


def test_configured_lines_win_and_none_turns_one_off(shape):
    _, _, lines = lines_for(shape, max_private_memory="2GiB", leak_threshold="none", rlimit_data="8GiB")
    assert lines.max_private_memory == 2 << 30 and lines.source("max_private_memory") == "configured"
    assert lines.leak_threshold is None and lines.source("leak_threshold") == "off"
    assert lines.rlimit_data == 8 << 30 and lines.source("rlimit_data") == "configured"


def test_a_configured_soft_line_above_the_estimate_is_never_undercut_by_the_derived_rlimit(shape):
    _, _, lines = lines_for(shape, max_private_memory="20GiB")
    assert lines.rlimit_data > lines.hard_private_memory


def test_gpu_layers_get_a_gpu_line(shape):
    _, figures, lines = lines_for(shape, n_gpu_layers="-1")
    assert lines.max_gpu_memory == int(1.5 * figures.gpu + 512 * MiB) and lines.source("max_gpu_memory") == "derived"


def samples(private_mib: list[float], context: list[int]) -> list[Sample]:
    return [Sample(at=float(i), private=int(p * MiB), file_rss=0, requests=i + 1, context=c)
            for i, (p, c) in enumerate(zip(private_mib, context))]


def test_a_conversation_filling_the_context_is_not_a_leak(shape):
    n_ctx = 8192
    _, figures, lines = lines_for(shape, n_ctx=str(n_ctx))
    limits = Limits(leak_threshold=lines.leak_threshold, context_growth=lines.context_growth,
                    warm_context=lines.warm_context)
    base = figures.private_at_load / MiB
    grows = (figures.private_peak - figures.private_at_load) / MiB
    # 20 turns, each adding 1/20 of the context: memory follows the estimate's growth, and a bit more.
    context = [lines.warm_context + (n_ctx - lines.warm_context) * (i + 1) // 20 for i in range(20)]
    private = [base + 1.2 * grows * (c - lines.warm_context) / (n_ctx - lines.warm_context) for c in context]
    assert grows > lines.leak_threshold / MiB  # without the context rule this growth would be a "leak"
    assert leak_decision(samples(private, context), int(base * MiB), limits).action == Action.NONE
    blind = Limits(leak_threshold=lines.leak_threshold)
    assert leak_decision(samples(private, context), int(base * MiB), blind).action == Action.RECYCLE


def test_a_steady_leak_of_2_mib_a_request_is_caught_within_20_requests_on_defaults(shape):
    _, figures, lines = lines_for(shape)
    limits = Limits(leak_threshold=lines.leak_threshold, context_growth=lines.context_growth,
                    warm_context=lines.warm_context)
    base = figures.private_at_load / MiB
    for n in range(1, 21):
        decision = leak_decision(samples([base + 2 * i for i in range(1, n + 1)], [300] * n), int(base * MiB), limits)
        if decision:
            break
    assert decision.action == Action.RECYCLE and n <= 20, n
    assert "MiB/request" in decision.reason
