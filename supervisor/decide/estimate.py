"""What a model will cost before it loads, from its GGUF header and its settings alone (pure).

The parts, as llama.cpp allocates them:
- weights: on the host, mmap'd (page cache: shared by replicas, not private, not a leak) or read into
  private memory with use_mmap off; the last n_gpu_layers layers on the GPU (the output head too once
  every layer is there; token embeddings always stay on the host);
- KV cache: n_ctx × per layer (KV heads × head size × bytes of type_k, and the same with type_v); llama.cpp
  clears it at load, so all of it is resident at once;
- compute buffers: reserved for a full n_ubatch over a full context (the attention scores without flash
  attention), but only touched as far as the context has grown: the figure at load covers the warm-up
  pass (one n_batch), the peak a full context;
- the output buffer: the logits of every sequence that samples in a step, n_vocab floats for each of
  `parallel` (host memory, also with every layer on a GPU). This is all `parallel` adds: the sequences share
  one KV pool of n_ctx cells (kv_unified), and the compute buffers are reserved for n_ubatch tokens
  whatever the number of sequences in them;
- the worker's own runtime (Python, llama_cpp, gRPC), and on a GPU the CUDA context.

An embedding worker (`embedding = true`) evaluates each input whole, in one physical batch of n_ctx tokens
every one of which is an output: its compute and output buffers are sized for that (see `estimate`).

Figures measured on this project's generated models (CPU build, llama-cpp-python 0.3.36) are in
docs/decisions.md; the test suite checks the estimate at load against measured private memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.settings.config import ModelConfig
from supervisor.settings.gguf_file import Shape

MiB = 1 << 20
# Bytes per value of each KV cache type (ggml block sizes: q8_0 stores 32 values in 34 bytes, …).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
# Private memory of a loaded worker beyond its model: the interpreter, llama_cpp, the gRPC server and its
# threads (measured: 23 MiB for a standby process with the runtime imported, 34 MiB once serving).
RUNTIME_BYTES = 34 * MiB
# GPU memory a process takes before any model: the CUDA context and cuBLAS workspace.
GPU_RUNTIME_BYTES = 400 * MiB
CTX_PAD = 256    # llama.cpp rounds the context up to a multiple of this


@dataclass(frozen=True)
class Estimate:
    n_ctx: int                 # as llama.cpp will allocate it
    replicas: int
    weights_mapped: int        # host, in the page cache: shared, counted once however many replicas
    weights_private: int       # host, read into the worker (use_mmap off; repacked weights included)
    weights_gpu: int
    kv_cpu: int
    kv_gpu: int
    compute_cpu_at_load: int
    compute_cpu_peak: int
    compute_gpu: int
    runtime: int
    gpu_runtime: int
    # Of weights_private: quantized matrices the CPU backend repacked into buffers of its own (Q4_0,
    # Q4_K, IQ4_NL), private to each worker even with use_mmap on: what repacking costs a replica.
    weights_repacked: int = 0
    outputs: int = 0  # logits of the `parallel` sequences sampling in one step
    parallel: int = 1

    @property
    def private_at_load(self) -> int:
        """One worker's private memory right after its load and warm-up."""
        return self.runtime + self.weights_private + self.kv_cpu + self.compute_cpu_at_load + self.outputs

    @property
    def private_peak(self) -> int:
        """One worker's private memory with its context full: what a budget must hold."""
        return self.runtime + self.weights_private + self.kv_cpu + self.compute_cpu_peak + self.outputs

    @property
    def gpu(self) -> int:
        """One worker's GPU memory."""
        return self.gpu_runtime + self.weights_gpu + self.kv_gpu + self.compute_gpu if self.gpu_runtime else 0

    @property
    def total_private(self) -> int:
        return self.private_peak * self.replicas

    @property
    def total_gpu(self) -> int:
        return self.gpu * self.replicas


def padded_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def compute_bytes(shape: Shape, n_ubatch: int, n_ctx: int, flash_attn: bool) -> int:
    """The largest tensors a forward pass holds at once, as Ollama's estimate models llama.cpp's graph:
    the attention scores (n_ctx × n_ubatch per head, f32) unless flash attention tiles them away, or the
    logits (n_vocab per token), whichever is larger. Without flash attention the CPU backend also
    converts the scores to f16 for their product with V, in a work buffer of its own (measured: +32 MiB
    at n_ctx 4096 with 8 heads)."""
    if flash_attn:  # no score matrix: activations, the f16 mask over the context, the FFN
        attention = 4 * n_ubatch * (1 + 4 * shape.n_embd + shape.n_ff) + 2 * n_ubatch * n_ctx
    else:
        attention = 4 * n_ubatch * (1 + 4 * shape.n_embd + n_ctx * (1 + shape.n_head)) + 2 * n_ubatch * n_ctx * shape.n_head
    return max(attention, 4 * n_ubatch * (shape.n_embd + shape.n_vocab))


def estimate(shape: Shape, config: ModelConfig) -> Estimate:
    n_layer = len(shape.layer_bytes)
    n_ctx = padded_ctx(config.n_ctx)
    on_gpu = n_layer + 1 if config.n_gpu_layers < 0 else min(config.n_gpu_layers, n_layer + 1)
    first_gpu_layer = n_layer - min(on_gpu, n_layer)  # llama.cpp offloads the last layers
    output_on_gpu = on_gpu > n_layer

    def kv(layer: int) -> int:
        heads = shape.n_head_kv[layer] if layer < len(shape.n_head_kv) else shape.n_head
        per_token = heads * (shape.head_dim_k * KV_TYPE_BYTES[config.type_k] + shape.head_dim_v * KV_TYPE_BYTES[config.type_v])
        return int(n_ctx * per_token)

    host_layers = range(first_gpu_layer)
    gpu_layers = range(first_gpu_layer, n_layer)
    weights_host = shape.input_bytes + sum(shape.layer_bytes[i] for i in host_layers) + (0 if output_on_gpu else shape.output_bytes)
    weights_gpu = sum(shape.layer_bytes[i] for i in gpu_layers) + (shape.output_bytes if output_on_gpu else 0)
    # The worker sets n_ubatch = n_batch: one physical batch of that size. An embedding worker evaluates a
    # whole input in one, so its batch is the context (worker/embedding.py).
    n_ubatch = n_ctx if config.embedding else config.n_batch
    warm = min(n_ctx, padded_ctx(config.n_batch))  # the warm-up pass fills one n_batch of context
    full = compute_bytes(shape, n_ubatch, n_ctx, config.flash_attn)
    logits = 4 * n_ubatch * (shape.n_embd + shape.n_vocab)
    all_on_gpu = on_gpu > 0 and first_gpu_layer == 0
    warm_ubatch = warm if config.embedding else n_ubatch  # the embedding warm-up is one input of n_batch tokens
    at_load = logits if all_on_gpu else compute_bytes(shape, warm_ubatch, warm, config.flash_attn)
    peak = logits if all_on_gpu else full
    outputs = 4 * shape.n_vocab * config.parallel
    if config.embedding:
        # Every token of an input is an output: llama.cpp keeps its logits and its vector on the host (checked:
        # the logits are there after an embedding decode). That buffer grows with the longest input, as the
        # touched compute buffers do, so it is counted with them: the leak rule forgives its growth.
        outputs = 0
        at_load += 4 * warm * (shape.n_vocab + shape.n_embd)
        peak += 4 * n_ctx * (shape.n_vocab + shape.n_embd)
    # Repacked matrices leave the mapping for a private buffer; with use_mmap off everything is private anyway.
    repacked = sum(shape.layer_repacked[i] for i in host_layers if i < len(shape.layer_repacked))
    repacked += 0 if output_on_gpu else shape.output_repacked
    return Estimate(
        n_ctx=n_ctx,
        replicas=config.replicas,
        weights_mapped=weights_host - repacked if config.use_mmap else 0,
        weights_private=repacked if config.use_mmap else weights_host,
        weights_repacked=repacked,
        weights_gpu=weights_gpu,
        kv_cpu=sum(kv(i) for i in host_layers),
        kv_gpu=sum(kv(i) for i in gpu_layers),
        # With every layer on the GPU the host keeps only the input and output staging.
        compute_cpu_at_load=at_load,
        compute_cpu_peak=peak,
        compute_gpu=full if on_gpu else 0,
        runtime=RUNTIME_BYTES,
        gpu_runtime=GPU_RUNTIME_BYTES if on_gpu else 0,
        outputs=outputs,
        parallel=1 if config.embedding else config.parallel,
    )


def mlock_refusal(figures: Estimate, memlock_limit: int, may_lock_any: bool) -> str:
    """Why use_mlock cannot work here, or "". llama.cpp only warns when mlock fails and runs unlocked:
    the operator asked for locked weights, so a load that cannot have them is refused instead.
    `memlock_limit` is RLIMIT_MEMLOCK (-1: unlimited); `may_lock_any`: the process has CAP_IPC_LOCK."""
    weights = figures.weights_mapped + figures.weights_private
    if may_lock_any or memlock_limit < 0 or weights <= memlock_limit:
        return ""
    return (f"use_mlock locks the weights ({weights / MiB:.1f} MiB) in RAM but RLIMIT_MEMLOCK allows "
            f"{memlock_limit / MiB:.1f} MiB: raise it (LimitMEMLOCK=infinity in the unit, `systemctl edit "
            f"llm-supervisor`) or leave use_mlock off")


def host_memory_note(figures: Estimate, available: int) -> str:
    """What an operator should know about weights that do not fit the free RAM, or ""."""
    if figures.weights_mapped > available:
        return (f"weights ({figures.weights_mapped / MiB:.0f} MiB) are larger than the free RAM ({available / MiB:.0f} "
                f"MiB): mmap'd, they are read from the file as needed, so tokens come slower than from RAM")
    return ""


def unmapped_refusal(figures: Estimate, available: int) -> str:
    """A load that would read more weights into memory than is free fails inside llama.cpp ("unable to
    allocate CPU buffer"): refuse it first, and say what works."""
    if figures.weights_private <= available:
        return ""
    if figures.weights_mapped:  # mmap'd, but the repacked matrices are copied into memory all the same
        return (f"llama.cpp repacks {figures.weights_repacked / MiB:.0f} MiB of its quantized weights (Q4_0, Q4_K, "
                f"IQ4_NL) into memory but only {available / MiB:.0f} MiB is free: free memory, or use a model "
                f"quantized to a type used as mapped (Q8_0, Q5_K, Q6_K)")
    return (f"use_mmap = false reads the weights ({figures.weights_private / MiB:.0f} MiB) into memory but only "
            f"{available / MiB:.0f} MiB is free: leave use_mmap on, and the weights are paged in from the file")
