"""The worker's gRPC service in embedding mode (`embedding = true`): Embed, one input at a time.

Every llama.cpp computation runs on one thread of its own, as the batch loop's do (one OpenMP thread
team: a second one's spinning threads cost the first its speed), so calls that overlap take turns there.
Tokenizing reads only the vocabulary and runs on gRPC's threads: a request's inputs are all checked
against the context before any is computed. The heartbeat is stamped before each input and after the
last, so the supervisor's hang rule sees progress per input.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2, worker_pb2_grpc

from .batching.loop import PoolStats
from .embedding import Embedder
from .engine import EngineInfo
from .service import warm_up_or_abort


class Cancelled(Exception):
    """The caller went away (cancelled, or past its deadline): the inputs left are not computed."""


class EmbeddingService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, name: str, engine: Embedder, info: EngineInfo,
                 beat: Callable[[PoolStats | None], None] = lambda stats=None: None) -> None:
        self.name = name
        self.engine = engine
        self.info = info
        self.beat = beat
        self.requests_served = 0
        self._active = self._cells = self._cells_high = 0  # the input being computed, for Info and the heartbeat
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    def warm_up(self) -> None:
        self._thread.submit(self.engine.warm_up).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def WarmUp(self, request, context) -> worker_pb2.WorkerInfo:
        warm_up_or_abort(self.name, self.warm_up, context)
        return self.Info(request, context)

    def Info(self, request, context) -> worker_pb2.WorkerInfo:
        n_ctx = self.info.n_ctx
        return worker_pb2.WorkerInfo(
            pid=os.getpid(), n_ctx=n_ctx, n_batch=self.info.n_batch, n_threads=self.info.n_threads,
            requests_served=self.requests_served, architecture=self.info.architecture,
            has_chat_template=self.info.has_chat_template, parallel=1, embedding=True,
            pool=pb.PoolStatus(parallel=1, n_ctx=n_ctx, sequences_active=self._active, cells_used=self._cells),
        )

    def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokens = self.engine.tokenize(request.text, request.add_special)
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens), n_ctx=self.info.n_ctx)

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"model {self.name!r} is an embedding model: use Embed (/v1/embeddings, /api/embed)")

    def Released(self, request: worker_pb2.ReleasedRequest, context) -> worker_pb2.ReleasedReply:
        return worker_pb2.ReleasedReply(freed=True)  # an Embed holds nothing once its call has ended

    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        start = time.perf_counter()
        inputs = self._tokenized(request, context)
        cancel = threading.Event()
        if not context.add_callback(cancel.set):  # the call has ended already
            cancel.set()
        try:
            vectors = self._thread.submit(self._embed_all, inputs, cancel).result()
        except Cancelled:
            context.abort(grpc.StatusCode.CANCELLED, f"model {self.name!r}: the request was cancelled")
        except Exception as e:  # llama.cpp's failure: the supervisor tells it with the worker's state
            context.abort(grpc.StatusCode.INTERNAL, f"model {self.name!r}: embedding failed: {type(e).__name__}: {e}")
        return pb.EmbedResponse(model=self.name, embeddings=[pb.Embedding(values=v) for v in vectors],
                                prompt_tokens=sum(len(tokens) for tokens in inputs), worker_pid=os.getpid(),
                                total_s=time.perf_counter() - start)

    def _tokenized(self, request: pb.EmbedRequest, context) -> list[list[int]]:
        """Each input's tokens, cut to n_ctx with `truncate`; a bad input fails the whole request, named."""
        if not request.input:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input is empty: give at least one text to embed")
        n_ctx, inputs = self.info.n_ctx, []
        for i, text in enumerate(request.input):
            if not text:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input[{i}] is empty")
            tokens = self.engine.tokenize(text, add_special=True)
            if len(tokens) > n_ctx and not request.truncate:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input[{i}] is {len(tokens)} tokens but model {self.name!r} has a context of {n_ctx} "
                              f"tokens (n_ctx); shorten it, ask for truncate, or load the model with a larger n_ctx")
            inputs.append(tokens[:n_ctx])
        return inputs

    def _embed_all(self, inputs: list[list[int]], cancel: threading.Event) -> list[list[float]]:
        """On the embedding thread: every input's vector, in order."""
        vectors = []
        try:
            for tokens in inputs:
                if cancel.is_set():
                    raise Cancelled()
                self._publish(1, len(tokens))  # a decode that hangs shows as silence from here
                vectors.append(self.engine.embed(tokens))
        finally:
            self._publish(0, 0)
        self.requests_served += 1
        return vectors

    def _publish(self, active: int, cells: int) -> None:
        self._active, self._cells = active, cells
        self._cells_high = max(self._cells_high, cells)
        self.beat(PoolStats(active, cells, 0, 0, self._cells_high))
