"""The generation loop: tokens from the engine → text pieces, with UTF-8-safe incremental
detokenisation and our own stop matching.

Linear in output length by construction: each token is decoded once, and stop matching only looks
at the text held back since the last piece went out (never the whole output).
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence


class TokenEngine(Protocol):
    def token_bytes(self, token: int) -> bytes: ...
    def is_end_of_generation(self, token: int) -> bool: ...
    def generate(self, prompt: Sequence[int], sampling: "Sampling") -> Iterator[int]: ...


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 0  # 0 = until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


# Why a generation ended; the names match the public FinishReason enum.
LENGTH, STOP, END_OF_TEXT, CANCELLED = "LENGTH", "STOP", "END_OF_TEXT", "CANCELLED"


@dataclass
class Piece:
    text: str
    tokens: int


@dataclass
class Outcome:
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    messages_dropped: int = 0  # chat turns left out to fit the context
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    first_token_at: float = field(default=0.0, repr=False)

    @property
    def tokens_per_second(self) -> float:
        # Decode speed after the first token, as llama.cpp's own timings report it.
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


class StopMatcher:
    """Holds back any tail of the text that could still become a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop matched). After a match, the rest is dropped."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buffer[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:n]):
                    keep = n
                    break
        self.held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def generate_text(
    engine: TokenEngine,
    prompt: Sequence[int],
    sampling: Sampling,
    n_ctx: int,
    cancel: threading.Event,
    outcome: Outcome,
    clock=time.perf_counter,
    beat=lambda: None,
) -> Iterator[Piece]:
    """Yield text pieces; fill `outcome` as it goes (finish reason, usage, timings). `beat` is the
    heartbeat: called per token, it proves progress to the supervisor."""
    start = clock()
    outcome.prompt_tokens = len(prompt)
    room = n_ctx - len(prompt)
    limit = min(sampling.max_tokens, room) if sampling.max_tokens else room
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(sampling.stop)
    pending_tokens = 0
    outcome.finish_reason = LENGTH
    tokens = engine.generate(prompt, sampling)
    for token in tokens:
        beat()
        if cancel.is_set():
            outcome.finish_reason = CANCELLED
            break
        if outcome.completion_tokens == 0:
            outcome.time_to_first_token_s = clock() - start
        if engine.is_end_of_generation(token):
            outcome.finish_reason = END_OF_TEXT
            break
        outcome.completion_tokens += 1
        pending_tokens += 1
        text, stopped = stops.feed(decoder.decode(engine.token_bytes(token)))
        if text or stopped:
            yield Piece(text, pending_tokens)
            pending_tokens = 0
        if stopped:
            outcome.finish_reason = STOP
            break
        if outcome.completion_tokens >= limit:
            break
        if cancel.is_set():
            outcome.finish_reason = CANCELLED
            break
    close = getattr(tokens, "close", None)
    if close:
        close()  # end the engine's generator now, not whenever it is collected
    if outcome.finish_reason != STOP:
        # Bytes of an unfinished UTF-8 sequence become U+FFFD rather than vanish.
        tail, stopped = stops.feed(decoder.decode(b"", final=True))
        if stopped:
            outcome.finish_reason = STOP
        else:
            tail += stops.flush()
        if tail or pending_tokens:
            yield Piece(tail, pending_tokens)
    outcome.total_s = clock() - start
