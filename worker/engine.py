"""The engine behind a worker: a small interface, with llama-cpp-python as the real one.

Config may name another class (`engine = "module:Class"`), so tests and future backends plug in without
touching the supervisor. An engine is used from one thread at a time.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

from .generation import Sampling

KV_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


class EngineError(Exception):
    """A request the engine cannot serve (e.g. a chat template that fails on these messages)."""


@dataclass(frozen=True)
class EngineInfo:
    n_ctx: int
    n_batch: int
    n_threads: int
    architecture: str
    has_chat_template: bool


class Engine(Protocol):
    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo: ...
    def tokenize(self, text: str, add_special: bool) -> list[int]: ...
    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...
    def token_bytes(self, token: int) -> bytes: ...
    def is_end_of_generation(self, token: int) -> bool: ...
    def cached_prefix(self, prompt: Sequence[int]) -> int: ...
    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]: ...
    def warm_up(self) -> None: ...
    def after_request(self) -> None: ...
    def close(self) -> None: ...


def load_engine_class(spec: str) -> type:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def default_threads() -> int:
    # llama-cpp-python's own default is half the CPUs; the cores we may run on is what we want.
    return max(len(os.sched_getaffinity(0)), 1)


class LlamaEngine:
    """llama_cpp.Llama with a fixed context: KV cache and buffers allocated once at load."""

    def __init__(self) -> None:
        self.on_progress = lambda: None  # the worker's heartbeat: called per prompt batch
        self._llama = None
        self._pieces: dict[int, bytes] = {}
        self._formatter = None

    def load(self, path: str, options: Mapping[str, Any]) -> EngineInfo:
        from llama_cpp import Llama

        n_threads = int(options.get("n_threads") or 0) or default_threads()
        self._llama = Llama(
            model_path=path,
            n_ctx=int(options["n_ctx"]),
            n_batch=int(options["n_batch"]),
            n_ubatch=int(options["n_batch"]),
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=int(options.get("n_gpu_layers", 0)),
            use_mmap=bool(options.get("use_mmap", True)),
            use_mlock=bool(options.get("use_mlock", False)),
            flash_attn=bool(options.get("flash_attn", False)),
            type_k=KV_TYPE_IDS[options.get("type_k", "f16")],
            type_v=KV_TYPE_IDS[options.get("type_v", "f16")],
            verbose=True,  # llama.cpp's log goes to stderr, which the supervisor keeps and logs
        )
        metadata = self._llama.metadata
        template = metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._special_text(self._llama.token_eos()),
                bos_token=self._special_text(self._llama.token_bos()),
            )
        return EngineInfo(
            n_ctx=self._llama.n_ctx(),
            n_batch=self._llama.n_batch,
            n_threads=n_threads,
            architecture=metadata.get("general.architecture", ""),
            has_chat_template=bool(template),
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

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
        return self._llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp

            vocab = self._llama._model.vocab
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, token))

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        """Prompt tokens the KV cache already holds from the previous request (reused, not re-evaluated)."""
        held = self._llama.input_ids[: self._llama.n_tokens]
        n = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            n += 1
        return min(n, len(prompt) - 1)

    def _evaluate_prompt(self, prompt: Sequence[int]) -> None:
        """Evaluate all but the last prompt token one n_batch at a time, with a heartbeat between batches
        (llama-cpp-python's generate() would evaluate the whole prompt in one silent call). The common
        prefix already in the KV cache is kept; generate() then finds all but one token cached."""
        llama = self._llama
        keep = self.cached_prefix(prompt)
        if keep <= 0 or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llama.reset()
        llama.n_tokens = keep
        for start in range(keep, len(prompt) - 1, llama.n_batch):
            self.on_progress()
            llama.eval(prompt[start:min(start + llama.n_batch, len(prompt) - 1)])

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        # The sampler is rebuilt by generate() from this seed: a fixed seed repeats a completion.
        self._llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        self._evaluate_prompt(prompt)
        # generate() keeps the longest common prefix in the KV cache: here all but the last token.
        return self._llama.generate(
            prompt,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
        )

    def warm_up(self) -> None:
        """One full n_batch of prompt and a few generated tokens before serving, so llama.cpp's buffers
        reach their working size and the supervisor's baseline is not mistaken growth later (measured on
        an H100: +127 MiB private and +54 MiB GPU over the first 40 requests without it)."""
        llama = self._llama
        filler = (self.tokenize(" the", add_special=False) or [llama.token_bos()])[-1]
        n = max(1, min(llama.n_batch, llama.n_ctx() - 8))
        prompt = [llama.token_bos()] + [filler] * (n - 1)
        # LlamaEngine's own generate, not an override: warming up is not a request.
        for _, _token in zip(range(4), LlamaEngine.generate(self, prompt, Sampling(temperature=0.0, seed=0))):
            pass
        malloc_trim()

    def after_request(self) -> None:
        malloc_trim()

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise, and it reads as private memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
