"""The monitor through its seams: /proc of a real process, and the NVML module fed with readings."""

from __future__ import annotations

import collections
import os
import time

from supervisor.observe.gpu import FedGpu, Nvml
from supervisor.observe.monitor import Monitor, read_cpu_temperature
from supervisor.decide.policies import Action, Limits, MiB, cpu_percent, decide
from supervisor.observe.procfs import MemorySample, read_memory


def test_private_memory_of_a_real_process_excludes_file_pages():
    memory = read_memory(os.getpid())
    assert memory is not None and memory.rss_anon > 0 and memory.rss_file > 0
    assert memory.private == memory.rss_anon + memory.swap
    assert read_memory(2**22 + 12345) is None  # gone is normal, not an error


def test_no_gpu_is_a_normal_state():
    nvml = Nvml.open()  # no driver on CI machines
    if not nvml.available:
        assert nvml.processes() == {} and nvml.readings() == []
    monitor = Monitor(nvml)
    sample = monitor.sample(os.getpid(), requests=0, gpus=monitor.host())
    assert sample is not None and sample.gpu is None  # without a GPU, or not a process on one


def test_gpu_memory_from_nvml_drives_the_gpu_lines():
    gpu = FedGpu()
    fake_memory = {1234: MemorySample(rss_anon=100 * MiB, rss_file=50 * MiB, swap=0)}
    clock = iter(range(100)).__next__
    monitor = Monitor(gpu, read=fake_memory.get, clock=clock, cpu=lambda pid: None)
    limits = Limits(max_gpu_memory=4096 * MiB, leak_threshold=512 * MiB)
    gpu.memory = {1234: {0: 1000 * MiB, 1: 2000 * MiB}, 999: {0: 10_000 * MiB}}  # another process's is not ours
    assert monitor.sample(1234, 0).gpu is None  # no tick has read NVML yet: absent, not zero
    baseline = monitor.sample(1234, 0, monitor.host())
    assert baseline.gpu == 3000 * MiB
    history, per_request = [baseline], []
    for i in range(1, 12):  # +40 MiB of GPU memory per request: a leak the trend catches
        gpu.memory[1234] = {0: 1000 * MiB, 1: (2000 + 40 * i) * MiB}
        sample = monitor.sample(1234, i, monitor.host())
        history.append(sample)
        per_request.append(sample)
    decision = decide(history, per_request, baseline, limits)
    assert decision.action == Action.RECYCLE and decision.reason.startswith("GPU memory leak: +40.0 MiB/request")
    gpu.memory[1234] = {0: 1000 * MiB, 1: 6000 * MiB}  # past 1.5 × max_gpu_memory, summed over devices
    history.append(monitor.sample(1234, 12, monitor.host()))
    assert decide(history, per_request, baseline, limits).action == Action.KILL


def test_cpu_time_of_a_real_process_and_cpu_percent_between_samples():
    monitor = Monitor(FedGpu())
    first = monitor.sample(os.getpid(), 0)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU so the figure cannot be 0
        pass
    second = monitor.sample(os.getpid(), 0)
    assert second.cpu_s - first.cpu_s >= 0.15
    assert 10 < cpu_percent([first, second]) <= 100 * os.cpu_count() + 1
    assert cpu_percent([first]) is None


def test_cpu_temperature_is_the_hottest_cpu_sensor_or_absent():
    shwtemp = collections.namedtuple("shwtemp", "label current high critical")
    sensors = {"coretemp": [shwtemp("Package id 0", 61.0, 80, 100), shwtemp("Core 1", 64.0, 80, 100)],
               "nvme": [shwtemp("Composite", 70.0, 80, 90)]}  # a disk is not the CPU
    assert read_cpu_temperature(lambda: sensors) == 64.0
    assert read_cpu_temperature(lambda: {}) is None
    assert read_cpu_temperature(lambda: {"acpitz": []}) is None
    real = read_cpu_temperature()  # this host's own sensors, if any: a number or absent, never an error
    assert real is None or 0 < real < 150
