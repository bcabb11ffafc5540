"""Write a small llama-architecture GGUF with random weights.

It is what the embedded default serves as `demo` (so a fresh machine sees the whole path work
without downloading weights) and what the tests and benchmarks load: it goes through the same
llama.cpp code as a real model, only its text is nonsense.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A ChatML-like template written with plain-text markers, so it needs no extra special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a an is was of to and in on it that for with as at by from this be are or not "
    "hello world model memory worker token stream supervisor leak cache context request "
    "one two three four five six seven eight nine ten yes no café naïve über 日本 語"
).split()


@dataclass(frozen=True)
class ModelShape:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx_train: int = 2048

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


TINY = ModelShape()
# The smallest shape every quantization fits: K-quants pack rows in blocks of 256 values.
QUANTIZABLE = ModelShape(n_embd=256, n_layer=2, n_head=4, n_head_kv=4, n_ff=512)
# About 100 MB of f32 weights: big enough that the engine, not the plumbing, dominates a benchmark.
BENCH = ModelShape(n_embd=1024, n_layer=2, n_head=16, n_head_kv=16, n_ff=3072)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-:")
    pieces += ["▁" + w for w in _WORDS]
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    # SentencePiece prefers the highest score: longer pieces first, so words beat letters.
    scores = [0.0] * 259 + [float(len(p)) - 100.0 for p in pieces]
    return tokens, scores, [int(t) for t in types]


def write_model(path: str | os.PathLike[str], shape: ModelShape = TINY, seed: int = 0, name: str = "demo",
                chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write the GGUF atomically (a reader never sees half a file) and return its path."""
    from gguf import GGUFWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    kv_width = shape.n_head_kv * shape.head_dim

    def weights(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)

    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_file_type(0)  # all f32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", weights(n_vocab, shape.n_embd))
    writer.add_tensor("output_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
    # Larger output weights make the next-token distribution peaked, so sampling picks the top few.
    output = weights(n_vocab, shape.n_embd) * 25
    # Zero rows give end-of-text and the raw byte tokens a logit of 0 while the best of the ~100 word
    # and letter logits is well above it: greedy decoding never stops by itself (tests control length
    # with max_tokens) and the text is made of words and letters, not stray bytes.
    output[2] = 0.0
    output[3:259] = 0.0
    writer.add_tensor("output.weight", output)
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(p + "attn_k.weight", weights(kv_width, shape.n_embd))
        writer.add_tensor(p + "attn_v.weight", weights(kv_width, shape.n_embd))
        writer.add_tensor(p + "attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(p + "ffn_down.weight", weights(shape.n_embd, shape.n_ff))
        writer.add_tensor(p + "ffn_up.weight", weights(shape.n_ff, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


# llama.cpp's file types (enum llama_ftype) for the quantizations real GGUFs ship in.
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25}


def quantize(source: str | os.PathLike[str], target: str | os.PathLike[str], kind: str) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (as `llama-quantize` does), atomically.
    Imports llama_cpp: call it from a worker, a check or a test, never from the daemon's process."""
    import llama_cpp

    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    os.replace(tmp, target)
    return target
