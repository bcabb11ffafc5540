"""The engine behind a worker: a small interface, with llama-cpp-python as the real one.

Config may name another class (`engine = "module:Class"`), so tests and future backends plug in without
touching the supervisor. An engine is used from one thread at a time (the batch loop's; tokenizing,
which reads only the vocabulary, from any).

The interface is a step's, not a request's: the batch loop (batching/loop.py) decides which sequences'
tokens go into each `decode`, and samples each sequence from its own `Sampler`. The real engine owns one
llama_context whose unified KV cache is the pool all `parallel` sequences share.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import random
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from .generation import Sampling

KV_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


class EngineError(Exception):
    """A request the engine cannot serve (e.g. a chat template that fails on these messages)."""


class NoRoom(Exception):
    """llama_decode found no room in the KV cache for the batch: the caller frees cells and retries."""


@dataclass(frozen=True)
class EngineInfo:
    n_ctx: int
    n_batch: int
    n_threads: int
    architecture: str
    has_chat_template: bool
    parallel: int = 1


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence in a batch: they take positions first_pos, first_pos + 1, …"""

    seq: int
    tokens: Sequence[int]
    first_pos: int
    logits: bool  # whether the last token's logits are wanted (the sequence samples after this step)


class Sampler(Protocol):
    def sample(self, index: int) -> int: ...  # from the logits of the batch's `index`-th token
    def close(self) -> None: ...


class Engine(Protocol):
    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo: ...
    def tokenize(self, text: str, add_special: bool) -> list[int]: ...
    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...
    def token_bytes(self, token: int) -> bytes: ...
    def control_tokens(self, texts: Sequence[str]) -> frozenset[int]: ...
    def is_end_of_generation(self, token: int) -> bool: ...
    def sampler(self, sampling: Sampling) -> Sampler: ...
    def decode(self, chunks: Sequence[Chunk]) -> None: ...
    def forget(self, seq: int, keep: int) -> int: ...  # drop a sequence's cells from `keep` on; cells kept
    def share(self, source: int, seq: int, n: int) -> int: ...  # the first n cells of source also seq's
    def warm_up(self) -> None: ...
    def after_request(self) -> None: ...
    def idle(self) -> None: ...
    def close(self) -> None: ...


def load_engine_class(spec: str) -> type:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def default_threads() -> int:
    # llama-cpp-python's own default is half the CPUs; the cores we may run on is what we want.
    return max(len(os.sched_getaffinity(0)), 1)


def threads(options: Mapping[str, Any]) -> int:
    return int(options.get("n_threads") or 0) or default_threads()


def load_model(path: str, options: Mapping[str, Any]):
    """The model (llama-cpp-python's LlamaModel), placed and mapped as the options say: what a generating
    and an embedding worker load alike."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel  # pinned version: see pyproject

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = int(options.get("n_gpu_layers", 0))
    params.use_mmap = bool(options.get("use_mmap", True))
    params.use_mlock = bool(options.get("use_mlock", False))
    return LlamaModel(path_model=path, params=params, verbose=True)


def context_params(options: Mapping[str, Any], n_batch: int, n_threads: int):
    """A context's parameters from the options both kinds of worker share; one physical batch of n_batch."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = int(options["n_ctx"])
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads
    params.type_k = KV_TYPE_IDS[options.get("type_k", "f16")]
    params.type_v = KV_TYPE_IDS[options.get("type_v", "f16")]
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.get("flash_attn")
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.no_perf = True
    return params


def log_metadata(model) -> dict[str, str]:
    """The model's GGUF header; printed whole, as llama-cpp-python's Llama does, chat template included, for
    the worker's log."""
    metadata = model.metadata()
    print(f"Model metadata: {metadata}", file=sys.stderr, flush=True)
    return metadata


PENALTY_LAST_N = 64  # tokens the penalties look back over, as llama.cpp's own default


class LlamaSampler:
    """One request's llama.cpp sampler chain: penalties, grammar, top-k, top-p, min-p, temperature, then a
    seeded draw (greedy at temperature 0). Its state — the penalties' recent tokens, the grammar's
    position — belongs to the request, so it survives a preemption unchanged."""

    def __init__(self, ctx, vocab, sampling: Sampling) -> None:
        import llama_cpp

        self._ctx = ctx
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # noqa: E731
        try:
            if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
                # This llama.cpp's penalties take the vocabulary size first (checked on a sampler by hand).
                add(llama_cpp.llama_sampler_init_penalties(llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N,
                                                           sampling.repeat_penalty, sampling.frequency_penalty,
                                                           sampling.presence_penalty))
            if sampling.grammar:
                grammar = llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise EngineError("the grammar does not parse (llama.cpp's log line above says where)")
                add(grammar)
            if sampling.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
                return
            if sampling.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
            add(llama_cpp.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()
            raise

    def sample(self, index: int) -> int:
        import llama_cpp

        # Also accepts the token into the chain (penalties' history, the grammar's state).
        return llama_cpp.llama_sampler_sample(self._chain, self._ctx, index)

    def close(self) -> None:
        import llama_cpp

        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class LlamaHandles:
    """A llama.cpp model, its context and a batch: what a generating and an embedding engine hold alike."""

    def __init__(self) -> None:
        self._model = None
        self._ctx = None
        self._batch = None

    def close(self) -> None:
        """Free them, the batch and the context before the model they use; once."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None


class LlamaEngine(LlamaHandles):
    """One llama.cpp model and context: the KV cache is a pool of n_ctx cells shared by `parallel`
    sequences (kv_unified), allocated once at load, like the compute buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._n_batch = 0
        self._pieces: dict[int, bytes] = {}
        self._pieces_lock = threading.Lock()
        self._control_tokens: dict[tuple[str, ...], frozenset[int]] = {}  # stop list → its control tokens' ids
        self._formatter = None
        self._prefix_reuse = True

    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo:
        import llama_cpp
        from llama_cpp._internals import LlamaContext  # pinned version: see pyproject

        self._model = load_model(path, options)
        n_threads = threads(options)
        n_batch = int(options["n_batch"])
        parallel = max(1, int(options.get("parallel", 1)))
        params = context_params(options, n_batch, n_threads)
        params.n_seq_max = parallel
        params.kv_unified = True  # one pool of n_ctx cells for all sequences, not n_ctx / parallel each
        self._ctx = LlamaContext(model=self._model, params=params, verbose=True)
        model = self._model.model
        self._prefix_reuse = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
                                  or llama_cpp.llama_model_n_swa(model) > 0)
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

        metadata = log_metadata(self._model)
        template = metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._special_text(self._model.token_eos()),
                bos_token=self._special_text(self._model.token_bos()),
            )
        return EngineInfo(
            n_ctx=llama_cpp.llama_n_ctx(self._ctx.ctx),
            n_batch=n_batch,
            n_threads=n_threads,
            architecture=metadata.get("general.architecture", ""),
            has_chat_template=bool(template),
            parallel=parallel,
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._model.detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if self._formatter is None:
            raise EngineError("this model's GGUF has no chat template (tokenizer.chat_template); use Generate")
        try:
            prompt = self._formatter(messages=[dict(m) for m in messages]).prompt
        except Exception as e:  # a template may raise_exception() on roles it does not support
            raise EngineError(f"the model's chat template refused these messages: {e}") from None
        bos = self._formatter.bos_token
        add_bos = not (bos and prompt.startswith(bos))
        # special=True: the template's own control tokens must become tokens, not text.
        return self._model.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp

            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n
            with self._pieces_lock:
                piece = self._pieces[token] = buf.raw[:n]
        return piece

    def control_tokens(self, texts: Sequence[str]) -> frozenset[int]:
        """Of these stop words, those that are one control token each (Ollama's stop lists are mostly
        these: `<|start_header_id|>`, `<|im_start|>`): their ids. A control token's piece is empty text,
        so no text match can see it."""
        key = tuple(texts)
        found = self._control_tokens.get(key)
        if found is None:  # a model's stop list comes with every request: tokenized once
            ids = set()
            for text in texts:
                tokens = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                if len(tokens) == 1 and not self.token_bytes(tokens[0]):
                    ids.add(tokens[0])
            found = frozenset(ids)
            if len(self._control_tokens) >= 64:  # requests' own stop lists vary: keep the cache bounded
                self._control_tokens.clear()
            self._control_tokens[key] = found
        return found

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def sampler(self, sampling: Sampling) -> LlamaSampler:
        return LlamaSampler(self._ctx.ctx, self._model.vocab, sampling)

    def decode(self, chunks: Sequence[Chunk]) -> None:
        """One llama_decode for every chunk, in order: a sampler then reads logits by batch index."""
        import llama_cpp

        total = sum(len(chunk.tokens) for chunk in chunks)
        if total > self._n_batch:  # before a write: the batch's arrays hold n_batch tokens
            raise ValueError(f"a batch of {total} tokens is more than n_batch ({self._n_batch})")
        batch = self._batch
        i = 0
        for chunk in chunks:
            last = len(chunk.tokens) - 1
            for j, token in enumerate(chunk.tokens):
                batch.token[i] = token
                batch.pos[i] = chunk.first_pos + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = chunk.seq
                batch.logits[i] = chunk.logits and j == last
                i += 1
        batch.n_tokens = i
        result = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if result == 1:
            raise NoRoom()
        if result != 0:
            raise RuntimeError(f"llama_decode failed ({result})")

    def forget(self, seq: int, keep: int) -> int:
        """Drop the sequence's cells from position `keep` on; the cells it keeps (all of them go when the
        memory cannot cut a sequence in the middle, as a recurrent model's cannot, or when a prefix may
        not be reused at all: see `share`)."""
        import llama_cpp

        memory = self._ctx.memory
        if keep and self._prefix_reuse and llama_cpp.llama_memory_seq_rm(memory, seq, keep, -1):
            return keep
        llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        return 0

    def share(self, source: int, seq: int, n: int) -> int:
        """Make `source`'s first n cells `seq`'s too (no copy: in the unified pool a cell belongs to a
        set of sequences); the cells `seq` starts with. A recurrent model's state cannot be cut at a
        position, and a sliding-window model's cache may have lost the window cells below one (llama.cpp
        reuses them for other sequences), so neither reuses a prefix: their requests evaluate their whole
        prompt, as llama-server's own fallback does."""
        import llama_cpp

        if n <= 0 or not self._prefix_reuse:
            return 0
        llama_cpp.llama_memory_seq_cp(self._ctx.memory, source, seq, 0, n)
        return n

    def warm_up(self) -> None:
        """One full n_batch of prompt and a few generated tokens before serving, so llama.cpp's buffers
        reach their working size and the supervisor's baseline is not mistaken growth later (measured on
        an H100: +127 MiB private and +54 MiB GPU over the first 40 requests without it)."""
        import llama_cpp

        filler = (self.tokenize(" the", add_special=False) or [self._model.token_bos()])[-1]
        n_ctx = llama_cpp.llama_n_ctx(self._ctx.ctx)
        n = max(1, min(self._n_batch, n_ctx - 8))
        prompt = [self._model.token_bos()] + [filler] * (n - 1)
        LlamaEngine.decode(self, [Chunk(0, prompt, 0, True)])
        sampler = LlamaEngine.sampler(self, Sampling(temperature=0.0))  # a test engine's own hooks: not a request
        try:
            last = n - 1
            for pos in range(n, n + 4):
                token = sampler.sample(last)
                last = 0
                LlamaEngine.decode(self, [Chunk(0, [token], pos, True)])
        finally:
            sampler.close()
            llama_cpp.llama_memory_clear(self._ctx.memory, True)
        malloc_trim()

    def after_request(self) -> None:
        """A request ended. The heap is trimmed by `idle`, once no sequence runs."""

    def idle(self) -> None:
        malloc_trim()



def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise, and it reads as private memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
