"""NVML seen from a container: the driver names processes by the host's PIDs, the daemon knows its own.

In a pod with a PID namespace of its own (Kubernetes' default) a worker that is PID 57 to the daemon is,
say, PID 812345 to NVML. These tests feed NVML (supervisor/observe/gpu.py's FedGpu) the host's PIDs and the
daemon a fake host /proc whose NSpid lines map them, as the node's /proc mounted at /host/proc would;
the workers, gRPC and the watch loop are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from supervisor.observe.gpu import HOST_PROC, INIT_PID_NAMESPACE, PROC, FedGpu, GpuReading, PidMap
from supervisor.observe.monitor import Monitor
from supervisor.observe.procfs import MemorySample
from tests.conftest import ROOT, model_table, wait_for
from tests.inprocess import MiB, InProcessDaemon

HOST_PID_BASE = 800_000  # host PIDs of a busy node are large; a pod's own are small


class HostProc:
    """A fake host /proc: each process the test adds is listed under a host PID with an NSpid line."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, host_pid: int, chain: list[int], stat: str) -> None:
        directory = self.root / str(host_pid)
        directory.mkdir(parents=True)
        nspid = "\t".join(str(p) for p in [host_pid, *chain])
        (directory / "status").write_text(f"Name:\tpython3\nTgid:\t{host_pid}\nNSpid:\t{nspid}\n")
        (directory / "stat").write_text(stat)

    def add_ours(self, host_pid: int, pid: int) -> None:
        """Our process `pid`, as the host lists it: the same start time, read from our own /proc."""
        self.add(host_pid, [pid], (PROC / str(pid) / "stat").read_text())

    def add_stranger(self, host_pid: int, pid: int) -> None:
        """Another container's process that happens to have the same PID in its own namespace."""
        stat = (PROC / str(pid) / "stat").read_text()
        head, _, tail = stat.rpartition(")")
        fields = tail.split()
        fields[19] = str(int(fields[19]) + 12345)  # started at another time: another process
        self.add(host_pid, [pid], f"{head}) {' '.join(fields)}\n")


def reading(index: int, temperature: int) -> GpuReading:
    return GpuReading(index=index, temperature_c=temperature, throttle_reasons=0,
                      memory_used=900 * MiB, memory_total=80_000 * MiB)


@pytest.fixture
def host_proc(tmp_path) -> HostProc:
    return HostProc(tmp_path / "host-proc")


def in_a_pod(model_dir, host_proc: HostProc, **options) -> InProcessDaemon:
    gpu = FedGpu(PidMap(host_proc=host_proc.root, nested=True))
    return InProcessDaemon(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512, **options), gpu=gpu)


# -- the whole daemon ------------------------------------------------------------------------------------

def test_a_worker_listed_by_its_host_pid_gets_its_gpu_memory_and_its_gpus_temperature_lines(model_dir, host_proc):
    daemon = in_a_pod(model_dir, host_proc, temperature_throttle=80, temperature_critical=90)
    try:
        pid = daemon.worker().pid
        host_proc.add_ours(HOST_PID_BASE + pid, pid)
        host_proc.add_stranger(HOST_PID_BASE + 1, pid)  # a neighbour pod's process, on GPU 1, which is hot
        daemon.gpu.memory = {HOST_PID_BASE + pid: {0: 500 * MiB}, HOST_PID_BASE + 1: {1: 300 * MiB}}
        daemon.gpu.gpus = [reading(0, 83), reading(1, 95)]
        worker = wait_for(lambda: (w := daemon.worker()).gpu_memory_bytes and w, what="the worker's GPU memory")
        assert worker.gpu_memory_bytes == 500 * MiB  # the neighbour's 300 MiB are not ours
        throttled = wait_for(lambda: daemon.worker().throttle_reason, what="GPU 0's throttle line")
        assert throttled.startswith("GPU 0 at 83 °C, at or above temperature_throttle (80 °C)")
        assert daemon.worker().pid == pid and daemon.worker().gpu_temperature_c == 83  # GPU 1 at 95 °C is not ours
    finally:
        daemon.stop()


def test_max_gpu_memory_fires_on_a_worker_listed_by_its_host_pid(model_dir, host_proc):
    daemon = in_a_pod(model_dir, host_proc, max_gpu_memory="100MiB")
    try:
        pid = daemon.worker().pid
        host_proc.add_ours(HOST_PID_BASE + pid, pid)
        daemon.gpu.memory = {HOST_PID_BASE + pid: {0: 500 * MiB}}
        daemon.gpu.gpus = [reading(0, 40)]
        recycled = wait_for(lambda: (w := daemon.worker()).recycles and w, what="the hard GPU memory line")
        assert recycled.last_recycle_reason == "GPU memory 500.0 MiB is above the hard line 150.0 MiB"
        wait_for(lambda: daemon.worker().pid not in (0, pid), what="a fresh worker")
    finally:
        daemon.stop()


# -- the translation, through fake /proc trees -----------------------------------------------------------

def test_a_host_pid_becomes_ours_only_for_the_same_process(host_proc):
    me = os.getpid()
    host_proc.add_ours(900_001, me)
    host_proc.add_stranger(900_002, me)
    pids = PidMap(host_proc=host_proc.root, nested=True)
    listed = {900_001: {0: 7 * MiB}, 900_002: {1: 9 * MiB}, 900_003: {0: 1 * MiB}}  # the last one has exited
    assert pids.translate(listed) == {me: {0: 7 * MiB}}
    assert PidMap().translate(listed) == listed  # on the host, or with hostPID: NVML's PIDs are ours


def fake_proc(root: Path, nspid: list[int]) -> Path:
    (root / "self").mkdir(parents=True)
    (root / "self" / "status").write_text("NSpid:\t" + "\t".join(map(str, nspid)) + "\n")
    return root


def test_detect_translates_through_the_host_proc_only_from_inside_a_namespace(tmp_path, monkeypatch):
    host = fake_proc(tmp_path / "host", [812_345, 57])  # the host lists us under two PIDs: theirs and ours
    own = fake_proc(tmp_path / "own", [57])
    monkeypatch.setattr("supervisor.observe.gpu.pid_namespace", lambda proc: 4026532301)  # a pod's own namespace
    assert PidMap.detect(own, host) == PidMap(host, own, nested=True)
    assert PidMap.detect(own, tmp_path / "not-mounted") == PidMap(None, own, nested=True)
    assert PidMap.detect(own, own) == PidMap(None, own, nested=True)  # our own /proc is not the host's
    monkeypatch.setattr("supervisor.observe.gpu.pid_namespace", lambda proc: INIT_PID_NAMESPACE)  # hostPID, bare metal
    assert PidMap.detect(own, host) == PidMap(None, own, nested=False)


# -- saying so when it cannot be done --------------------------------------------------------------------

def test_a_daemon_that_cannot_map_nvmls_pids_says_why_once_and_names_the_fix():
    gpu = FedGpu(PidMap(nested=True))  # in a pod without hostPID or the host's /proc
    monitor = Monitor(gpu, read={57: MemorySample(rss_anon=MiB, rss_file=0, swap=0)}.get, cpu=lambda pid: None)
    gpu.memory = {812_345: {0: 500 * MiB}}  # our worker 57, by its host PID
    gpu.gpus = [reading(0, 50)]
    with capture_logs() as logs:
        for _ in range(3):
            assert monitor.sample(57, 0, monitor.host()).gpu is None
    assert monitor.gpu_note.startswith("NVML lists 1 process(es) on GPU 0 by the host's PIDs")
    assert "hostPID: true" in monitor.gpu_note and "/host/proc" in monitor.gpu_note
    assert [e["event"] for e in logs] == ["gpu_processes_unmapped"]  # once, not every tick
    assert logs[0]["log_level"] == "warning" and logs[0]["reason"] == monitor.gpu_note
    gpu.memory[57] = {0: 400 * MiB}  # a collision or a sandbox that maps them: a worker is listed
    monitor.host()
    assert monitor.gpu_note == ""


def test_no_note_on_the_host_where_nvmls_other_processes_are_just_not_ours():
    gpu = FedGpu()  # bare metal: NVML lists someone else's training job
    monitor = Monitor(gpu, read={57: MemorySample(rss_anon=MiB, rss_file=0, swap=0)}.get, cpu=lambda pid: None)
    gpu.memory = {4242: {0: 500 * MiB}}
    with capture_logs() as logs:
        monitor.sample(57, 0, monitor.host())
        monitor.host()
    assert monitor.gpu_note == "" and logs == []


def test_the_daemonset_mounts_the_nodes_proc_where_the_daemon_looks_for_it():
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(HOST_PROC))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/proc" and mount["readOnly"] is True
    assert not pod.get("hostPID")  # the narrower of the two ways
