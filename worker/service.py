"""The worker's gRPC service: up to `parallel` generations at once, each streamed back with coalescing.

Generation runs on the batch loop's thread (batching/loop.py), which hands each request's pieces over its
own queue; the response stream takes whatever has piled up since its last message and sends it as one chunk, so a slow
reader gets fewer, larger messages instead of a backlog of thousands. Messages go out at most every
`stream_interval` seconds (the first at once): each message wakes three processes (worker, supervisor,
client), and on a box whose cores all run llama.cpp's threads those wake-ups cost tokens/s.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Callable, Iterator

import grpc

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2, worker_pb2_grpc

from .batching.loop import DONE, BatchLoop, PoolStats, Request
from .engine import Engine, EngineError, EngineInfo
from .generation import Outcome, Sampling, TextStream
from .history import drop_oldest


RELEASE_WAIT_S = 10.0  # Released without a deadline waits at most this long
NO_DEADLINE_S = 1e6  # time_remaining() beyond this means the call has no deadline


def grammar_from(options: pb.SamplingOptions) -> str:
    """The GBNF that constrains the output: `grammar` as given, or `json_schema` converted by
    llama-cpp-python's own converter. Raises EngineError with what is wrong."""
    if options.grammar:
        return options.grammar
    if not options.json_schema:
        return ""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        schema = json.loads(options.json_schema)
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises what it meets: KeyError, ValueError, RecursionError…
        raise EngineError(f"json_schema cannot be turned into a grammar: {type(e).__name__}: {e}") from None


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
        frequency_penalty=opt("frequency_penalty", 0.0),
        presence_penalty=opt("presence_penalty", 0.0),
        seed=opt("seed", None),
        stop=tuple(options.stop),
        grammar=grammar_from(options),
    )


def warm_up_or_abort(name: str, warm_up: Callable[[], None], context) -> None:
    try:
        warm_up()
    except MemoryError:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {name!r}: out of memory in the warm-up pass")
    except Exception as e:  # the supervisor reports it as a failed load
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"model {name!r}: the warm-up pass failed: {type(e).__name__}: {e}")


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, name: str, engine: Engine, info: EngineInfo, stream_interval: float = 0.0,
                 beat: Callable[[PoolStats | None], None] = lambda stats=None: None) -> None:
        self.name = name
        self.beat = beat
        self.stream_interval = stream_interval
        self.engine = engine
        self.info = info
        # Every computation runs on the loop's thread. Tokenizing and rendering chat templates read only
        # the vocabulary, which llama.cpp never changes, so they run on gRPC's threads meanwhile.
        self.loop = BatchLoop(engine, info, beat)
        self._live: dict[int, threading.Event] = {}  # request_id → set once its sequence holds no cell
        self._live_lock = threading.Lock()

    @property
    def requests_served(self) -> int:
        return self.loop.requests_served

    def warm_up(self) -> None:
        self.loop.call(self.engine.warm_up)

    def close(self) -> None:
        self.loop.stop()

    def WarmUp(self, request, context) -> worker_pb2.WorkerInfo:
        warm_up_or_abort(self.name, self.warm_up, context)
        return self.Info(request, context)

    def Info(self, request, context) -> worker_pb2.WorkerInfo:
        stats = self.loop.stats
        return worker_pb2.WorkerInfo(
            pid=os.getpid(), n_ctx=self.info.n_ctx, n_batch=self.info.n_batch, n_threads=self.info.n_threads,
            requests_served=self.requests_served, architecture=self.info.architecture,
            has_chat_template=self.info.has_chat_template, parallel=len(self.loop.slots),
            pool=pb.PoolStatus(parallel=len(self.loop.slots), n_ctx=self.info.n_ctx,
                                sequences_active=stats.active, cells_used=stats.cells,
                                sequences_cached=stats.cached, preemptions=stats.preemptions),
        )

    def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokens = self.engine.tokenize(request.text, request.add_special)
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens), n_ctx=self.info.n_ctx)

    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"model {self.name!r} generates text and does not embed: set `embedding = true` in "
                      f"[models.{self.name}] for a model that serves Embed")

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
                # history's renders are progress too — unless the loop is at work, whose own beats
                # must not be masked by renders when it hangs.
                if not self.loop.working:
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
        start = time.perf_counter()
        freed = self._track(request.request_id)
        submitted = False
        try:
            try:
                prompt, dropped = self._prompt(request, context)
                sampling = sampling_from(request.options)
                sampler = self.engine.sampler(sampling)
            except EngineError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {self.name!r}: {e}")
            # Time to first token counts the template's render and the wait for a sequence.
            stream = TextStream(self.engine, len(prompt), sampling, self.info.n_ctx, Outcome(messages_dropped=dropped),
                                start=start, stop_tokens=self.engine.control_tokens(sampling.stop))
            work = Request(prompt, sampling, sampler, stream, freed=freed)
            # Client gone, cancelled or past its deadline: freed at the next step. add_callback refuses (False)
            # when the call has already ended, as it may have during a long render.
            if not context.add_callback(work.cancel.set):
                work.cancel.set()
            self.loop.submit(work)
            submitted = True
            yield from self._stream(work, context)
        finally:
            if not submitted:
                freed.set()
            self._untrack(request.request_id, freed)

    def _track(self, request_id: int) -> threading.Event:
        freed = threading.Event()
        if request_id:
            with self._live_lock:
                self._live[request_id] = freed
        return freed

    def _untrack(self, request_id: int, freed: threading.Event) -> None:
        """Forget the request once its cells are free (Released waits on it until then)."""
        if request_id and freed.is_set():
            with self._live_lock:
                self._live.pop(request_id, None)

    def Released(self, request: worker_pb2.ReleasedRequest, context) -> worker_pb2.ReleasedReply:
        with self._live_lock:
            freed = self._live.get(request.request_id)
        if freed is None:  # over already, or never arrived (then it is cancelled before it is admitted)
            return worker_pb2.ReleasedReply(freed=True)
        # The caller's deadline bounds the wait; without one, time_remaining() is ~9e18 (too large to wait on).
        remaining = context.time_remaining()
        done = freed.wait(remaining if remaining < NO_DEADLINE_S else RELEASE_WAIT_S)
        if done:
            with self._live_lock:
                self._live.pop(request.request_id, None)
        return worker_pb2.ReleasedReply(freed=done)

    def _stream(self, work: Request, context) -> Iterator[pb.GenerateChunk]:
        last_sent = 0.0
        while True:
            items = self._take(work.out, last_sent + self.stream_interval)
            last_sent = time.monotonic()
            done = items[-1] is DONE or isinstance(items[-1], BaseException)
            body = items[:-1] if done else items
            text = "".join(p.text for p in body)
            tokens = sum(p.tokens for p in body)
            if not done:
                yield pb.GenerateChunk(text=text, tokens=tokens)
                continue
            if isinstance(items[-1], BaseException):
                context.abort(grpc.StatusCode.INTERNAL, f"model {self.name!r}: generation failed: {items[-1]}")
            yield self._final(text, tokens, work.outcome)
            return

    @staticmethod
    def _take(pieces: queue.SimpleQueue, not_before: float) -> list:
        """At least one item; then whatever arrives until `not_before`, or until the end of the stream."""
        items = [pieces.get()]
        while not (items[-1] is DONE or isinstance(items[-1], BaseException)):
            try:
                remaining = not_before - time.monotonic()
                items.append(pieces.get(timeout=remaining) if remaining > 0 else pieces.get_nowait())
            except queue.Empty:
                break
        return items

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
