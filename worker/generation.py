"""Per request: sampled tokens → text pieces, with UTF-8-safe incremental detokenisation and our own
stop matching.

Linear in output length by construction: each token is decoded once, and stop matching only looks
at the text held back since the last piece went out (never the whole output).
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class TokenEngine(Protocol):
    def token_bytes(self, token: int) -> bytes: ...
    def is_end_of_generation(self, token: int) -> bool: ...


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 0  # 0 = until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str = ""  # GBNF; a json_schema arrives here already converted


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


class TextStream:
    """One request's tokens → text pieces: UTF-8-safe detokenisation, stop matching, the token limit,
    and its usage and timings in `outcome`. Fed one sampled token at a time by the batch loop."""

    def __init__(self, engine: TokenEngine, prompt_tokens: int, sampling: Sampling, n_ctx: int,
                 outcome: Outcome, clock=time.perf_counter, start: float | None = None,
                 stop_tokens: frozenset[int] = frozenset()) -> None:
        """`start`: when the request arrived (on `clock`), if before now: timings count from then.
        `stop_tokens`: stop words that are control tokens (`<|eot_id|>`, `<|im_start|>`), which come out
        as no text at all, so only their id can stop the request."""
        self.engine = engine
        self.outcome = outcome
        self.clock = clock
        self.start = clock() if start is None else start
        outcome.prompt_tokens = prompt_tokens
        outcome.finish_reason = LENGTH
        room = n_ctx - prompt_tokens
        self.limit = min(sampling.max_tokens, room) if sampling.max_tokens else room
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(sampling.stop)
        self.stop_tokens = stop_tokens
        self.pending_tokens = 0
        self.finished = False

    def feed(self, token: int) -> Piece | None:
        """The text this token lets out, if any; sets `finished` when the request is complete."""
        outcome = self.outcome
        if outcome.completion_tokens == 0:
            outcome.time_to_first_token_s = self.clock() - self.start
        if self.engine.is_end_of_generation(token):
            return self.end(END_OF_TEXT)
        if token in self.stop_tokens:  # like a stop word's text: not sent, the request ends here
            return self.end(STOP)
        outcome.completion_tokens += 1
        self.pending_tokens += 1
        text, stopped = self.stops.feed(self.decoder.decode(self.engine.token_bytes(token)))
        if stopped:
            self.finished = True
            outcome.finish_reason = STOP
            outcome.total_s = self.clock() - self.start
            return self._piece(text)
        if outcome.completion_tokens >= self.limit:
            return self.end(LENGTH, text)
        return self._piece(text) if text else None

    def end(self, reason: str, text: str = "") -> Piece | None:
        """Finish with `reason` (unless a stop already did), after `text`: what was held back goes out,
        with bytes of an unfinished UTF-8 sequence as U+FFFD rather than vanishing."""
        if self.finished:
            return None
        self.finished = True
        self.outcome.finish_reason = reason
        tail, stopped = self.stops.feed(self.decoder.decode(b"", final=True))
        if stopped:
            self.outcome.finish_reason = STOP
        else:
            tail += self.stops.flush()
        tail = text + tail
        self.outcome.total_s = self.clock() - self.start
        return self._piece(tail) if tail or self.pending_tokens else None

    def _piece(self, text: str) -> Piece:
        piece = Piece(text, self.pending_tokens)
        self.pending_tokens = 0
        return piece
