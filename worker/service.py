"""The worker's gRPC service: one generation at a time, streamed back with coalescing.

Generation runs on one dedicated thread (the worker's single slot) and hands pieces over a queue; the
response stream takes whatever has piled up since its last message and sends it as one chunk, so a slow
reader gets fewer, larger messages instead of a backlog of thousands. Messages go out at most every
`stream_interval` seconds (the first at once): each message wakes three processes (worker, supervisor,
client), and on a box whose cores all run llama.cpp's threads those wake-ups cost tokens/s.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import grpc

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2, worker_pb2_grpc

from .engine import Engine, EngineError, EngineInfo
from .generation import Outcome, Sampling, generate_text
from .history import drop_oldest

_DONE = object()


def sampling_from(options: pb.SamplingOptions) -> Sampling:
    def opt(name: str, default):
        return getattr(options, name) if options.HasField(name) else default

    return Sampling(
        max_tokens=options.max_tokens,
        temperature=opt("temperature", 0.8),
        top_p=opt("top_p", 0.95),
        top_k=opt("top_k", 40),
        min_p=opt("min_p", 0.05),
        repeat_penalty=opt("repeat_penalty", 1.0),
        seed=opt("seed", None),
        stop=tuple(options.stop),
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, name: str, engine: Engine, info: EngineInfo, stream_interval: float = 0.0,
                 beat: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.beat = beat
        self.stream_interval = stream_interval
        self.engine = engine
        self.info = info
        self.requests_served = 0
        # The single slot: generations run one after another on this thread. Tokenizing reads only the
        # vocabulary, which llama.cpp never changes, so it runs on gRPC's threads meanwhile.
        # Every llama.cpp computation must run on this one thread: libgomp keeps an OpenMP thread team per
        # calling thread, and a second team's spinning threads cost a quarter of tokens/s on 2 cores.
        self._slot = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def warm_up(self) -> None:
        self._slot.submit(self.engine.warm_up).result()

    def WarmUp(self, request, context) -> worker_pb2.WorkerInfo:
        try:
            self.warm_up()
        except MemoryError:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {self.name!r}: out of memory in the warm-up pass")
        except Exception as e:  # the supervisor reports it as a failed load
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"model {self.name!r}: the warm-up pass failed: {type(e).__name__}: {e}")
        return self.Info(request, context)

    def Info(self, request, context) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            pid=os.getpid(), n_ctx=self.info.n_ctx, n_batch=self.info.n_batch, n_threads=self.info.n_threads,
            requests_served=self.requests_served, architecture=self.info.architecture,
            has_chat_template=self.info.has_chat_template,
        )

    def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokens = self.engine.tokenize(request.text, request.add_special)
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens), n_ctx=self.info.n_ctx)

    def _prompt(self, request: worker_pb2.WorkerGenerateRequest, context) -> tuple[list[int], int]:
        """The prompt's tokens, and how many chat messages were left out to fit it in the context."""
        n_ctx, max_tokens = self.info.n_ctx, request.options.max_tokens
        dropped = 0
        if request.WhichOneof("input") == "chat":
            # The oldest turns go until the prompt leaves room for the reply: max_tokens, or without
            # one a quarter of the context. The final chunk's usage says how many went.
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            limit = n_ctx - (max_tokens or n_ctx // 4)
            if request.max_prompt_tokens:
                limit = min(limit, request.max_prompt_tokens)
            prompt: list[int] = []

            def fits(kept: list[dict[str, str]]) -> bool:
                nonlocal prompt
                # The supervisor counts a busy worker silent past heartbeat_timeout as hung: a long
                # history's renders are progress too.
                self.beat()
                prompt = self.engine.chat_prompt(kept)
                return len(prompt) <= limit

            _, dropped = drop_oldest(messages, fits)  # the last messages it tried are those kept
        else:
            prompt = self.engine.tokenize(request.prompt, add_special=True)
        cap = request.max_prompt_tokens
        if cap and len(prompt) > cap:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt is {len(prompt)} tokens but model {self.name!r} takes at most {cap} "
                          f"(max_prompt_tokens); shorten it")
        if len(prompt) >= n_ctx:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt is {len(prompt)} tokens but model {self.name!r} has a context of {n_ctx} tokens "
                          f"(n_ctx), which must also hold the reply; shorten the prompt or load the model with a larger n_ctx")
        if max_tokens and len(prompt) + max_tokens > n_ctx:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) is more than model {self.name!r}'s "
                          f"context of {n_ctx} tokens (n_ctx); ask for at most {n_ctx - len(prompt)} tokens")
        return prompt, dropped

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, context) -> Iterator[pb.GenerateChunk]:
        try:
            prompt, dropped = self._prompt(request, context)
        except EngineError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sampling = sampling_from(request.options)
        cancel = threading.Event()
        context.add_callback(cancel.set)  # client gone or cancelled: stop at the next token
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        outcome = Outcome(messages_dropped=dropped)
        self._slot.submit(self._run, prompt, sampling, cancel, pieces, outcome)
        last_sent = 0.0
        while True:
            items = self._take(pieces, last_sent + self.stream_interval)
            last_sent = time.monotonic()
            done = items[-1] is _DONE or isinstance(items[-1], BaseException)
            body = items[:-1] if done else items
            text = "".join(p.text for p in body)
            tokens = sum(p.tokens for p in body)
            if not done:
                yield pb.GenerateChunk(text=text, tokens=tokens)
                continue
            if isinstance(items[-1], BaseException):
                context.abort(grpc.StatusCode.INTERNAL, f"model {self.name!r}: generation failed: {items[-1]}")
            yield self._final(text, tokens, outcome)
            return

    @staticmethod
    def _take(pieces: queue.SimpleQueue, not_before: float) -> list:
        """At least one item; then whatever arrives until `not_before`, or until the end of the stream."""
        items = [pieces.get()]
        while not (items[-1] is _DONE or isinstance(items[-1], BaseException)):
            try:
                remaining = not_before - time.monotonic()
                items.append(pieces.get(timeout=remaining) if remaining > 0 else pieces.get_nowait())
            except queue.Empty:
                break
        return items

    def _run(self, prompt: list[int], sampling: Sampling, cancel: threading.Event,
             pieces: queue.SimpleQueue, outcome: Outcome) -> None:
        try:
            self.beat()
            outcome.cached_prompt_tokens = self.engine.cached_prefix(prompt)
            for piece in generate_text(self.engine, prompt, sampling, self.info.n_ctx, cancel, outcome, beat=self.beat):
                pieces.put(piece)
            self.requests_served += 1
            pieces.put(_DONE)
        except Exception as e:  # reported to the client as INTERNAL; the worker stays up
            traceback.print_exc()
            pieces.put(e)
        finally:
            self.engine.after_request()

    def _final(self, text: str, tokens: int, outcome: Outcome) -> pb.GenerateChunk:
        return pb.GenerateChunk(
            text=text,
            tokens=tokens,
            finish_reason=pb.FinishReason.Value(f"FINISH_REASON_{outcome.finish_reason}"),
            usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                           cached_prompt_tokens=outcome.cached_prompt_tokens, messages_dropped=outcome.messages_dropped),
            timings=pb.Timings(time_to_first_token_s=outcome.time_to_first_token_s,
                               tokens_per_second=outcome.tokens_per_second, total_s=outcome.total_s),
            model=self.name,
            worker_pid=os.getpid(),
        )
