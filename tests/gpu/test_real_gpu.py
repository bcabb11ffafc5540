"""Opt-in checks on a real NVIDIA GPU: real NVML, a CUDA build of llama-cpp-python, the real daemon.

CI has no GPU, so everywhere else the NVML seam is fed (tests/test_thermal.py, tests/test_gpu_namespace.py).
These tests close the gap on a GPU machine: a generated model loads with every layer on the GPU, and the
supervisor must see the worker's GPU memory and the GPU's temperature as NVML reports them, and the
estimate it admits loads by must be near what the worker really takes.

    bash .gpu/build.sh && export PYTHONPATH=/tmp/site:$PWD:$PWD/protos && python3 -m pytest tests/gpu -x

(/work/shared/gpu/README.md: `.gpu/` is made by ../shared/gpu/prepare.sh.) Without an NVIDIA GPU and
driver, or with a CPU build of llama-cpp-python, the module is skipped before anything is loaded: one
NVML init that fails at once, so `python -m pytest` on a CPU machine pays nothing for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def why_no_gpu() -> str:
    """"" when NVML answers and lists a GPU; else why these tests cannot run."""
    try:
        import pynvml
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"no NVIDIA GPU or driver here (NVML: {e})"
    try:
        return "" if pynvml.nvmlDeviceGetCount() else "NVML lists no GPU"
    finally:
        pynvml.nvmlShutdown()


def why_no_cuda_build() -> str:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return ""
    return (f"llama-cpp-python {llama_cpp.__version__} is a CPU build: rebuild it with CMAKE_ARGS=-DGGML_CUDA=on "
            f"(or run bash .gpu/build.sh on the GPU machine)")


REASON = why_no_gpu() or why_no_cuda_build()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

import pynvml  # noqa: E402  (only where there is a GPU)

from llm_supervisor.v1 import supervisor_pb2 as pb  # noqa: E402
from supervisor.settings.demo_model import ModelShape, write_model  # noqa: E402
from supervisor.observe.gpu import PidMap  # noqa: E402
from tests.conftest import ROOT, launch, model_table, wait_for  # noqa: E402

MiB = 1 << 20
# ~820 MB of f32 weights and 128 MiB of f16 KV cache at n_ctx 4096: big enough that the weights and the
# cache, not the CUDA context (~0.4–0.5 GiB, a constant in the estimate), decide the GPU figure.
SHAPE = ModelShape(n_embd=2048, n_layer=4, n_head=16, n_head_kv=16, n_ff=5632, n_ctx_train=4096)
N_CTX = 4096
# The estimate's GPU figure may be this far either side of NVML's: the bound the CPU side keeps
# (tests/test_estimate.py). Under it, admission by gpu_memory_budget would refuse or overcommit by a quarter.
ESTIMATE_BOUND = 0.25


def nvml_memory(pid: int) -> tuple[int, set[int]]:
    """The worker's GPU memory and devices, read here with pynvml, apart from the daemon's own reads.
    PIDs go through PidMap as the daemon's do: NVML names processes by the host's PIDs."""
    pynvml.nvmlInit()
    try:
        listed: dict[int, dict[int, int]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                listed.setdefault(p.pid, {})[index] = p.usedGpuMemory or 0
    finally:
        pynvml.nvmlShutdown()
    devices = PidMap.detect().translate(listed).get(pid, {})
    return sum(devices.values()), set(devices)


@pytest.fixture(scope="module")
def gpu_daemon():
    directory = Path(tempfile.mkdtemp(prefix="llms-gpu-"))
    write_model(directory / "gpu.gguf", SHAPE)
    # launch() sets PYTHONPATH to the checkout; the GPU machine's llama_cpp and wheels live in /tmp/site.
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "protos"), os.environ.get("PYTHONPATH", "")) if p)
    daemon = launch(directory, model_table("gpu", "gpu.gguf", n_ctx=N_CTX, n_gpu_layers=-1),
                    prefix=("env", f"PYTHONPATH={path}"))
    # One request that fills most of the context in full batches: the GPU's buffers grow to the largest
    # batch they have seen, so the figures are compared after it, not after load.
    one = daemon.stub.Tokenize(pb.TokenizeRequest(model="gpu", text="the model " * 100)).count
    prompt = "the model " * int(100 * (N_CTX - 64) / one)
    chunks = list(daemon.stub.Generate(pb.GenerateRequest(model="gpu", prompt=prompt,
                                                          options=pb.SamplingOptions(max_tokens=8))))
    assert chunks[-1].usage.completion_tokens == 8
    yield daemon
    daemon.stop()
    shutil.rmtree(directory, ignore_errors=True)


def settled_gpu_memory(daemon) -> tuple[pb.WorkerStatus, int, set[int]]:
    """Status's figure once a poll has caught up with NVML's (they are read a poll interval apart)."""
    def caught_up():
        worker = daemon.worker("gpu")
        measured, devices = nvml_memory(worker.pid)
        close = measured and abs(worker.gpu_memory_bytes - measured) <= 0.02 * measured
        return close and (worker, measured, devices)

    return wait_for(caught_up, timeout=30, interval=0.5, what="Status's GPU memory to match NVML's")


def test_the_supervisor_sees_the_workers_gpu_memory(gpu_daemon):
    worker, measured, devices = settled_gpu_memory(gpu_daemon)
    listed = {m.name: m for m in gpu_daemon.stub.ListModels(pb.ListModelsRequest()).models}["gpu"]
    assert devices and worker.gpu_memory_bytes > listed.estimate.weights_gpu_bytes, (worker, measured / MiB)


def test_the_gpus_temperature_is_read_and_is_the_models(gpu_daemon):
    worker, _, devices = settled_gpu_memory(gpu_daemon)
    status = gpu_daemon.stub.Status(pb.StatusRequest())
    temperatures = {g.index: g.temperature_c for g in status.gpus}
    assert devices <= temperatures.keys() and all(10 <= t <= 110 for t in temperatures.values()), status.gpus
    # The model's figure is the hottest of its GPUs at a poll; a GPU drifts a degree or two between reads.
    worker = wait_for(lambda: (w := gpu_daemon.worker("gpu")).gpu_temperature_c and w, what="the model's temperature")
    assert abs(worker.gpu_temperature_c - max(temperatures[i] for i in devices)) <= 3, (worker, status.gpus)
    assert worker.throttle_reason == "" and all(g.memory_total_bytes > g.memory_used_bytes > 0 for g in status.gpus)


def test_the_estimates_gpu_figure_is_within_a_quarter_of_what_nvml_shows(gpu_daemon):
    _, measured, _ = settled_gpu_memory(gpu_daemon)
    estimate = {m.name: m for m in gpu_daemon.stub.ListModels(pb.ListModelsRequest()).models}["gpu"].estimate
    ratio = estimate.gpu_bytes / measured
    assert 1 - ESTIMATE_BOUND < ratio < 1 + ESTIMATE_BOUND, (
        f"estimate {estimate.gpu_bytes / MiB:.0f} MiB vs NVML {measured / MiB:.0f} MiB", estimate)
