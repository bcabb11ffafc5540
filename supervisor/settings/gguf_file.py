"""Find a model file inside the allowed directories and check it is a GGUF before any worker starts."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Sequence

from supervisor.errors import not_found, precondition

GGUF_MAGIC = b"GGUF"


# ggml types whose weight matrices llama.cpp's CPU backend (x86-64 with AVX2, this project's default build
# level, and ARM with dot-product instructions) repacks at load into interleaved blocks for faster matrix
# products: Q4_0 → q4_0_8x8, Q4_K → q4_K_8x8, IQ4_NL → iq4_nl_8x8 (its log's "CPU_REPACK model buffer").
# Measured with llama-cpp-python 0.3.36: Q8_0, Q5_K and Q6_K are used as mapped.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


@dataclass(frozen=True)
class Shape:
    """What memory estimates need from the header: the model's dimensions and where its bytes are."""

    n_embd: int = 0
    n_head: int = 0
    n_head_kv: tuple[int, ...] = ()  # per layer (some models vary it)
    head_dim_k: int = 0
    head_dim_v: int = 0
    n_ff: int = 0
    n_vocab: int = 0
    layer_bytes: tuple[int, ...] = ()  # the tensors of blk.N, by N
    input_bytes: int = 0   # token embeddings: llama.cpp keeps them on the CPU
    output_bytes: int = 0  # the output head and norm: on the GPU only when every layer is
    # Of those, the bytes of matrices llama.cpp's CPU backend repacks into buffers of its own (see
    # estimate.REPACKED_TYPES): private to each worker, not mmap'd, not shared by replicas.
    layer_repacked: tuple[int, ...] = ()
    output_repacked: int = 0


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str
    file_size: int
    n_ctx_train: int
    n_layer: int
    has_chat_template: bool
    shape: Shape = Shape()
    # What Ollama's /api/show tells: the template as the GGUF has it, its quantization, how many weights.
    chat_template: str = ""
    file_type: str = ""  # "Q4_K_M", "F16" … from general.file_type; "" when the header does not say
    parameter_count: int = 0
    modified_ns: int = 0  # the file's mtime when it was read


def resolve_model_path(path: str, model_dirs: Sequence[Path]) -> Path:
    """The real path of `path`, which must lie inside one of `model_dirs` once symlinks are resolved."""
    if not path or "\x00" in path:
        raise precondition("model path is empty")
    if ".." in PurePath(path).parts:
        raise precondition(f"model path {path!r} contains '..'; give a path inside the model directories")
    roots = [d.resolve() for d in model_dirs]
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        real = candidate.resolve()
        inside = any(real.is_relative_to(root) for root in roots)
        if not inside:
            raise precondition(
                f"model path {path!r} resolves to {real}, outside the allowed model directories "
                f"({', '.join(map(str, roots))}); add its directory to [supervisor] model_dirs"
            )
        if real.is_file():
            return real
    raise not_found(f"no model file {path!r} in the model directories ({', '.join(map(str, roots))})")


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header with the gguf package; anything that is not a loadable GGUF is FAILED_PRECONDITION."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
        stat = path.stat()
        size = stat.st_size
    except OSError as e:
        raise precondition(f"cannot read model file {path}: {e.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise precondition(f"{path} is not a GGUF file (its first bytes are {head[:4]!r}, not b'GGUF')")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise precondition(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    if len(head) < 24:
        raise precondition(f"{path} is not a valid GGUF file: it ends inside its header ({size} bytes)")
    tensors, keys = struct.unpack("<QQ", head[8:24])
    # Each tensor's entry takes at least 24 bytes of the file and each key at least 12: counts beyond
    # that are a damaged or hostile header, refused before any reader tries to allocate for them.
    if tensors * 24 + keys * 12 > size:
        raise precondition(f"{path} is not a valid GGUF file: its header declares {tensors} tensors and {keys} "
                           f"keys, more than its {size} bytes can hold")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        fields = {name: field for name, field in reader.fields.items()}

        def value(key: str, default=None):
            field = fields.get(key)
            return default if field is None else field.contents()

        arch = value("general.architecture")
        n_tensors = len(reader.tensors)
        parameters = sum(int(t.n_elements) for t in reader.tensors)
        needed = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        shape = _shape(reader, lambda key, default=0: value(f"{arch}.{key}", default),
                       int(value(f"{arch}.block_count", 0) or 0)) if arch else None
    except Exception as e:  # the reader raises many kinds on damaged files: say what they have in common
        raise precondition(f"{path} is not a valid GGUF file: its metadata is damaged or cut short "
                           f"({type(e).__name__}: {e})") from None
    if not arch:
        raise precondition(f"{path} is not a valid GGUF file: general.architecture is missing")
    if n_tensors == 0:
        raise precondition(f"{path} is not a valid GGUF file: it holds no tensors")
    if needed > size:
        # llama.cpp would refuse it at load, or a worker mapping it would die of SIGBUS mid-request.
        raise precondition(f"{path} is truncated: its tensors need {needed} bytes and the file has {size} "
                           f"(a download or copy that did not finish?)")
    return GGUFInfo(
        path=path,
        architecture=str(arch),
        name=str(value("general.name", path.stem)),
        file_size=size,
        n_ctx_train=int(value(f"{arch}.context_length", 0) or 0),
        n_layer=int(value(f"{arch}.block_count", 0) or 0),
        has_chat_template=value("tokenizer.chat_template") is not None,
        shape=shape,
        chat_template=str(value("tokenizer.chat_template", "")),
        file_type=file_type_name(value("general.file_type")),
        parameter_count=parameters,
        modified_ns=stat.st_mtime_ns,
    )


def file_type_name(number) -> str:
    """general.file_type as the quantization's usual name: 15 → "Q4_K_M"."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(number)).name
    except (TypeError, ValueError):
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _largest(value) -> int:
    """Some models give a per-layer array where most give one number."""
    return int(max(value, default=0)) if isinstance(value, list) else int(value or 0)


def _shape(reader, value, n_layer: int) -> Shape:
    n_embd, n_head = int(value("embedding_length")), _largest(value("attention.head_count"))
    kv = value("attention.head_count_kv", n_head)
    n_head_kv = tuple(int(k) for k in kv) if isinstance(kv, list) else (int(kv),) * n_layer
    head_dim = n_embd // n_head if n_head else 0
    layers, repacked = [0] * n_layer, [0] * n_layer
    input_bytes = output_bytes = output_repacked = 0
    for tensor in reader.tensors:
        name, size = tensor.name, int(tensor.n_bytes)
        # A weight matrix of a repacked type; token embeddings are looked up row by row, never repacked.
        repacks = tensor.tensor_type.name in REPACKED_TYPES and len(tensor.shape) == 2
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            if index < n_layer:
                layers[index] += size
                repacked[index] += size if repacks else 0
        elif name.startswith("token_embd"):
            input_bytes += size
        else:
            output_bytes += size
            output_repacked += size if repacks else 0
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return Shape(n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                 head_dim_k=int(value("attention.key_length", head_dim)),
                 head_dim_v=int(value("attention.value_length", head_dim)),
                 n_ff=_largest(value("feed_forward_length")), n_vocab=len(tokens.data) if tokens else 0,
                 layer_bytes=tuple(layers), input_bytes=input_bytes, output_bytes=output_bytes,
                 layer_repacked=tuple(repacked), output_repacked=output_repacked)
