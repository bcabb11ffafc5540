"""Policies on synthetic sample series: pure, no processes."""

from __future__ import annotations

import random

import pytest

from supervisor.decide.policies import (Action, Heat, Limits, MiB, Sample, Thermal, decide, draw_max_requests, hard_line,
                                 heat_level, hung_for, keep_alive_expired, leak_decision, memory_decision,
                                 replacement_first, restart_delay, unload_in, Usage)


def series(values_mib, start_requests=1, gpu_mib=None):
    return [Sample(at=float(i), private=int(v * MiB), file_rss=100 * MiB, requests=start_requests + i,
                   gpu=None if gpu_mib is None else int(gpu_mib[i] * MiB)) for i, v in enumerate(values_mib)]


BASE = 100  # MiB after warm-up
LEAK = Limits(leak_threshold=256 * MiB, max_private_memory=1024 * MiB)


@pytest.mark.parametrize("name, values, action, words", [
    ("flat", [BASE + (i % 3) for i in range(40)], Action.NONE, ""),
    ("one spike", [BASE] * 20 + [BASE + 400] + [BASE] * 19, Action.NONE, ""),
    ("steady leak", [BASE + 8 * i for i in range(20)], Action.RECYCLE, "+8.0 MiB/request over 19 requests"),
    ("slow leak not yet", [BASE + 1 * i for i in range(12)], Action.NONE, ""),
    ("noisy but growing", [BASE + 10 * i + (15 if i % 2 else -15) for i in range(20)], Action.RECYCLE, "MiB/request"),
    ("already grown", [BASE + 300] * 3, Action.RECYCLE, "above leak_threshold"),
    ("too few to judge a trend", [BASE + 20 * i for i in range(5)], Action.NONE, ""),
    ("one step up, then flat", [BASE] * 10 + [BASE + 120] * 30, Action.NONE, ""),
])
def test_leak_trend_versus_spike_versus_flat(name, values, action, words):
    decision = leak_decision(series(values), BASE * MiB, LEAK)
    assert decision.action == action, (name, decision.reason)
    assert words in decision.reason


def test_leak_decision_names_rate_and_span_in_figures():
    decision = leak_decision(series([BASE + 8 * i for i in range(20)]), BASE * MiB, LEAK)
    assert decision.figures["bytes_per_request"] == 8 * MiB and decision.figures["requests"] == 19


@pytest.mark.parametrize("values, limits, action, words", [
    ([500, 500], Limits(max_private_memory=1024 * MiB), Action.NONE, ""),
    ([500, 1100], Limits(max_private_memory=1024 * MiB), Action.NONE, ""),  # one sample above: not yet
    ([1100, 1100], Limits(max_private_memory=1024 * MiB), Action.RECYCLE, "above max_private_memory (1024.0 MiB)"),
    ([500, 1600], Limits(max_private_memory=1024 * MiB), Action.KILL, "above the hard line 1536.0 MiB"),
    # rlimit_data bounds VmData, not resident memory: private memory near it is no reason to act.
    ([500, 1300], Limits(max_private_memory=1024 * MiB, rlimit_data=1280 * MiB), Action.NONE, ""),
    ([5000, 5000], Limits(), Action.NONE, ""),
])
def test_memory_lines(values, limits, action, words):
    decision = memory_decision(series(values), limits)
    assert decision.action == action and words in decision.reason


def test_gpu_memory_lines_only_when_there_is_a_gpu():
    limits = Limits(max_gpu_memory=2048 * MiB)
    assert memory_decision(series([100, 100], gpu_mib=[3000, 3000]), limits).action == Action.RECYCLE
    assert memory_decision(series([100, 100], gpu_mib=[3100, 3100]), limits).reason.startswith("GPU memory")
    assert memory_decision(series([100, 100]), limits).action == Action.NONE
    assert memory_decision(series([100, 100], gpu_mib=[100, 3100]), limits).action == Action.KILL


def test_hard_line_is_the_soft_line_times_the_factor():
    assert hard_line(1000, Limits(hard_factor=1.5)) == 1500
    assert hard_line(1000, Limits(hard_factor=1.5, rlimit_data=1200)) == 1500
    assert hard_line(None, Limits()) is None


@pytest.mark.parametrize("private_mib, data_mib, action", [
    (100, 900, Action.NONE),     # well below the limit's 95%
    (100, 980, Action.KILL),     # little resident, but the reserved data segment is at the limit
    (1000, 200, Action.NONE),    # resident memory is not what RLIMIT_DATA counts
])
def test_rlimit_data_is_compared_with_the_data_segment_not_resident_memory(private_mib, data_mib, action):
    samples = [Sample(at=float(i), private=private_mib * MiB, file_rss=0, data=data_mib * MiB) for i in range(2)]
    decision = memory_decision(samples, Limits(rlimit_data=1024 * MiB))
    assert decision.action == action
    if action:
        assert "VmData" in decision.reason and "rlimit_data (1024.0 MiB)" in decision.reason


def test_one_decision_per_tick_the_most_severe():
    limits = Limits(max_private_memory=1024 * MiB, leak_threshold=256 * MiB, max_requests=5)
    history = series([400, 1600])
    per_request = series([100 + 50 * i for i in range(10)])
    decision = decide(history, per_request, per_request[0], limits)
    assert decision.action == Action.KILL  # not also a recycle for the leak and the request count


def test_max_requests_with_jitter_drawn_once():
    rng = random.Random(1)
    draws = {draw_max_requests(1000, 50, rng) for _ in range(50)}
    assert min(draws) >= 1000 and max(draws) <= 1050 and len(draws) > 1
    assert draw_max_requests(0, 50, rng) == 0
    limits = Limits(max_requests=1020)
    assert not decide([], series([100] * 3, start_requests=1017), None, limits)
    assert decide([], series([100] * 3, start_requests=1018), None, limits).action == Action.RECYCLE


@pytest.mark.parametrize("failures, delay", [(0, 0), (1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)])
def test_restart_back_off(failures, delay):
    assert restart_delay(failures) == delay


@pytest.mark.parametrize("idle_s, keep_alive, load, expired", [
    (10, 300, 0, False), (301, 300, 0, True), (0, 0, 0, True), (0, 0, 2, False),
    (10**9, float("inf"), 0, False), (400, 300, 1, False),
])
def test_keep_alive(idle_s, keep_alive, load, expired):
    assert keep_alive_expired(last_used=1000.0, now=1000.0 + idle_s, keep_alive=keep_alive, load=load) == expired


def test_unload_in_counts_down_or_says_never():
    assert unload_in(100.0, 160.0, 300.0) == 240.0
    assert unload_in(100.0, 900.0, 300.0) == 0.0
    assert unload_in(100.0, 160.0, float("inf")) == -1.0


@pytest.mark.parametrize("last_beat, busy_since, now, silent", [
    (100.0, 90.0, 130.0, 30.0),   # no beat for 30 s of a 20 s timeout
    (125.0, 90.0, 130.0, None),   # a beat 5 s ago
    (50.0, 120.0, 130.0, None),   # the only beat is from the previous request, but this one is 10 s old
    (None, 100.0, 130.0, 30.0),   # never beat at all
])
def test_hung_means_no_progress_past_the_timeout(last_beat, busy_since, now, silent):
    assert hung_for(last_beat, busy_since, now, timeout=20.0) == silent


def walk(temperatures, thermal=Thermal(throttle=85, critical=92, hysteresis=5)):
    level, levels = Heat.NORMAL, []
    for t in temperatures:
        level = heat_level(level, t, thermal)
        levels.append(level.name)
    return levels


@pytest.mark.parametrize("name, temperatures, levels", [
    ("cool", [60, 70, 84], ["NORMAL"] * 3),
    ("at the throttle line", [84, 85], ["NORMAL", "THROTTLE"]),
    ("hovering at the line does not flap", [85, 84, 83, 85, 82, 81],
     ["THROTTLE", "THROTTLE", "THROTTLE", "THROTTLE", "THROTTLE", "THROTTLE"]),
    ("leaves only below line - hysteresis", [86, 81, 80, 79], ["THROTTLE", "THROTTLE", "NORMAL", "NORMAL"]),
    ("critical, cooling through throttle", [93, 90, 88, 87, 84, 80],
     ["CRITICAL", "CRITICAL", "CRITICAL", "THROTTLE", "THROTTLE", "NORMAL"]),
    ("straight to critical from cold", [50, 99], ["NORMAL", "CRITICAL"]),
])
def test_temperature_levels_with_hysteresis(name, temperatures, levels):
    assert walk(temperatures) == levels


def test_a_temperature_line_set_to_zero_is_off():
    assert walk([99, 120], Thermal(throttle=0, critical=0)) == ["NORMAL", "NORMAL"]
    assert walk([99], Thermal(throttle=85, critical=0)) == ["THROTTLE"]
    assert walk([99], Thermal(throttle=0, critical=92)) == ["CRITICAL"]


@pytest.mark.parametrize("budget, in_use, needed, first, words", [
    (Usage(), Usage(10**12), Usage(10**12), True, ""),                               # no budget: always first
    (Usage(1000 * MiB), Usage(600 * MiB), Usage(300 * MiB), True, ""),
    (Usage(1000 * MiB), Usage(800 * MiB), Usage(300 * MiB), False, "memory_budget (1000.0 MiB) cannot hold both"),
    (Usage(0, 8000 * MiB), Usage(100 * MiB, 6000 * MiB), Usage(50 * MiB, 3000 * MiB), False, "gpu_memory_budget"),
    (Usage(0, 8000 * MiB), Usage(10**12, 1000 * MiB), Usage(10**12, 3000 * MiB), True, ""),  # no RAM budget set
])
def test_replacement_first_only_when_the_budgets_hold_both(budget, in_use, needed, first, words):
    answer, why = replacement_first(budget, in_use, needed)
    assert answer == first and words in why


def test_a_soft_line_below_the_workers_own_baseline_recycles_nothing_but_the_hard_line_still_kills():
    """Every replacement would start above such a line too: recycling would loop forever."""
    limits = Limits(max_private_memory=1024 * MiB)
    baseline = Sample(at=0.0, private=1100 * MiB, file_rss=0)
    assert memory_decision(series([1100, 1100]), limits, baseline).action == Action.NONE
    assert memory_decision(series([1100, 1100]), limits).action == Action.RECYCLE  # no baseline known: as before
    assert memory_decision(series([1100, 1600]), limits, baseline).action == Action.KILL
