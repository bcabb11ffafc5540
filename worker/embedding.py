"""Embedding mode's engine: one llama.cpp context that turns each input into one pooled, unit-length vector.

A model loaded with `embedding = true` runs this instead of the generation engine and its batch loop
(worker/main.py picks it, worker/embedding_service.py serves it). An input is evaluated in one physical
batch: a non-causal model (BERT and its kin) attends over the whole input at once and pools it at the
end of the batch, so its tokens cannot be split across ubatches. Hence n_batch = n_ubatch = n_ctx, and
an input is at most n_ctx tokens.

Pooling is the GGUF's own (`<arch>.pooling_type`: mean, CLS or last token) when the header states one,
else the mean of the token vectors (docs/decisions.md, "Embeddings"). Vectors are L2-normalized, as
OpenAI's and Ollama's APIs return them.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Protocol, Sequence

from .engine import EngineError, EngineInfo, LlamaEngine, LlamaHandles, context_params, load_engine_class, load_model
from .engine import log_metadata, malloc_trim, threads

# llama.cpp's enum llama_pooling_type.
POOLING_UNSPECIFIED, POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = -1, 0, 1, 2, 3, 4
POOLING_NAMES = {POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}


class Embedder(Protocol):
    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo: ...
    def tokenize(self, text: str, add_special: bool) -> list[int]: ...
    def embed(self, tokens: Sequence[int]) -> list[float]: ...  # one input, at most n_ctx tokens; unit length
    def warm_up(self) -> None: ...
    def close(self) -> None: ...


def embedder_class(spec: str) -> type:
    """The engine of an embedding worker. `engine` names the generation engine by default
    (worker.engine:LlamaEngine), which cannot embed: llama.cpp's embedder stands in for it and for its
    subclasses; a class of another backend must have `embed` itself."""
    cls = load_engine_class(spec)
    if hasattr(cls, "embed"):
        return cls
    if issubclass(cls, LlamaEngine):
        return LlamaEmbedder
    raise EngineError(f"engine {spec} cannot embed (it has no embed method): name one that can, or drop "
                      f"`embedding = true`")


def pooling_of(metadata: Mapping[str, str]) -> int:
    """The pooling the model's vectors get: the GGUF's own where it states one, else the mean. Stated
    "none" counts as unstated — it means a vector per token, not one per input. A reranker's "rank"
    pooling scores a pair of texts and yields no embedding: such a model is refused."""
    stated = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
    pooling = int(stated) if stated not in (None, "") else POOLING_UNSPECIFIED
    if pooling == POOLING_RANK:
        raise EngineError("the GGUF's pooling_type is rank: a reranker, which scores pairs of texts and has "
                          "no embeddings to serve")
    return pooling if pooling in POOLING_NAMES else POOLING_MEAN


def unit(vector: Sequence[float]) -> list[float]:
    """`vector` scaled to length 1 (L2); all zeros stay zeros rather than becoming NaN."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)


class LlamaEmbedder(LlamaHandles):
    """One llama.cpp model and a context in embedding mode for one sequence. Used from one thread."""

    def __init__(self) -> None:
        super().__init__()
        self.n_ctx = 0
        self.n_embd = 0
        self.pooling = POOLING_MEAN
        self._warm_tokens = 0

    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo:
        import llama_cpp
        from llama_cpp._internals import LlamaContext  # pinned version: see pyproject

        self._model = load_model(path, options)
        metadata = log_metadata(self._model)
        self.pooling = pooling_of(metadata)
        n_threads = threads(options)
        n_ctx = int(options["n_ctx"])
        params = context_params(options, n_ctx, n_threads)  # a whole input in one ubatch
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = self.pooling
        self._ctx = LlamaContext(model=self._model, params=params, verbose=True)
        ctx, model = self._ctx.ctx, self._model.model
        # llama.cpp may round the context up: an input must fit both it and the physical batch.
        self.n_ctx = min(llama_cpp.llama_n_ctx(ctx), llama_cpp.llama_n_ubatch(ctx))
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self._warm_tokens = max(1, min(int(options["n_batch"]), self.n_ctx))
        print(f"embedding: pooling {POOLING_NAMES[self.pooling]}, n_embd {self.n_embd}, inputs of up to "
              f"{self.n_ctx} tokens", file=sys.stderr, flush=True)
        return EngineInfo(n_ctx=self.n_ctx, n_batch=self.n_ctx, n_threads=n_threads,
                          architecture=metadata.get("general.architecture", ""),
                          has_chat_template=bool(metadata.get("tokenizer.chat_template")), parallel=1)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """One input's vector. Every token is an output: pooling reads them all."""
        import llama_cpp

        if not 0 < len(tokens) <= self.n_ctx:  # before a write: the batch's arrays hold n_ctx tokens
            raise ValueError(f"an input of {len(tokens)} tokens; 1 to {self.n_ctx} fit")
        # A causal model's cells must hold this input alone; a non-causal one (BERT) has none, and llama_decode
        # runs its encoder (as llama-cpp-python's own Llama.embed relies on).
        self._ctx.kv_cache_clear()
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        result = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if result != 0:
            raise RuntimeError(f"llama_decode failed ({result})")
        pooled = llama_cpp.llama_get_embeddings_seq(self._ctx.ctx, 0)
        if not pooled:
            raise RuntimeError("llama.cpp returned no pooled embedding")
        return unit(pooled[:self.n_embd])

    def warm_up(self) -> None:
        """One input of n_batch tokens before serving, as the generation engine's warm-up: llama.cpp's
        buffers reach their working size before the supervisor takes the worker's memory baseline."""
        filler = (self.tokenize(" the", add_special=False) or [0])[-1]
        self.embed([filler] * self._warm_tokens)
        malloc_trim()
