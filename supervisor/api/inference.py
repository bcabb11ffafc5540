"""A generation or embedding request, whichever API it came through: checked, fitted to the model's
settings, queued and run on the model's worker, counted. The gRPC service (server/api.py) and the HTTP
APIs (http/) are adapters around this: they translate requests and errors, nothing more."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2

from worker.history import drop_oldest, strip_thinking

from supervisor.catalog.on_demand import OnDemand
from supervisor.catalog.registry import Registry
from supervisor.errors import ApiError, precondition
from supervisor.serving.runtime import ModelRuntime
from supervisor.server.metrics import RequestMetrics
from supervisor.api.validation import (check_inputs, check_keep_alive, check_messages, check_model_name, check_options,
                                       check_prompt)
from supervisor.settings.config import ModelConfig


class Inference:
    def __init__(self, registry: Registry, metrics: RequestMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.catalog = OnDemand(registry)

    async def runtime(self, model: str) -> ModelRuntime:
        """The model a request names, loaded now if it is on disk and not loaded (load_on_demand)."""
        check_model_name(model)
        return await self.catalog.runtime(model)

    def generate(self, request: pb.GenerateRequest, api: str,
                 arrived: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """`arrived` (time.monotonic): when the request came, if its adapter waited before (for a load on
        demand: that counts in usage.load_s)."""
        work = worker_pb2.WorkerGenerateRequest(prompt=request.prompt, options=request.options)
        return self._stream(request.model, request.keep_alive, work, api, lambda: check_prompt(request.prompt),
                            arrived=arrived)

    def chat(self, request: pb.ChatRequest, api: str, arrived: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        work = worker_pb2.WorkerGenerateRequest(chat=request, options=request.options)

        def shape(config: ModelConfig) -> int:
            messages, dropped = chat_history(request.messages, config)
            del work.chat.messages[:]
            work.chat.messages.extend(messages)
            return dropped

        return self._stream(request.model, request.keep_alive, work, api, lambda: check_messages(request.messages),
                            shape, arrived)

    async def embed(self, request: pb.EmbedRequest, api: str) -> pb.EmbedResponse:
        """A vector per input, from a model loaded with `embedding = true`. Raises ApiError."""
        model = request.model
        try:
            check_inputs(request.input)
            runtime = await self.runtime(model)
            model = runtime.name  # as resolved: `llama3` may have meant `llama3:latest`
            if not runtime.config.embedding:
                raise precondition(f"model {model!r} generates text and does not embed: set `embedding = true` in "
                                   f"[models.{model}] for a model that serves Embed")
            response = await runtime.embed(request, request_keep_alive(request.keep_alive, runtime.config))
            if self.metrics:
                self.metrics.embedded(model, api)
            return response
        except ApiError as e:
            self._failed(model, e, api)
            raise

    def _failed(self, model: str, error: ApiError, api: str) -> None:
        if self.metrics and model in self.registry.models:  # no label for names nobody loaded
            self.metrics.failed(model, error.code.name, api)

    async def _stream(self, model: str, keep_alive: str, request: worker_pb2.WorkerGenerateRequest, api: str,
                      check: Callable[[], None],
                      shape: Callable[[ModelConfig], int] = lambda config: 0,
                      arrived: float | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """Generate and Chat alike: `check` is the request's own validation (prompt or messages); `shape`
        fits it to the model's settings and says how many chat messages that left out. Raises ApiError."""
        arrived = time.monotonic() if arrived is None else arrived  # a load on demand's wait counts in load_s
        try:
            check()
            runtime = await self.runtime(model)
            model = runtime.name  # as resolved: `llama3` may have meant `llama3:latest`
            if runtime.config.embedding:  # its worker would refuse it too: say so before it queues
                raise precondition(f"model {model!r} is an embedding model: use Embed (/v1/embeddings, /api/embed)")
            request.options.CopyFrom(check_options(request.options, runtime.config))
            request.max_prompt_tokens = runtime.config.max_prompt_tokens
            dropped = shape(runtime.config)
            keep = request_keep_alive(keep_alive, runtime.config)
            # aclosing: a cancelled client must free the model's slot now, not when the generator is collected.
            last = None
            async with aclosing(runtime.generate(request, keep, arrived)) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason:
                        chunk.usage.messages_dropped += dropped  # the worker's own count is for n_ctx
                    last = chunk
                    yield chunk
            if last is not None:
                runtime.last_tokens_per_second = last.timings.tokens_per_second
                if self.metrics:
                    self.metrics.finished(model, last, api)
        except ApiError as e:
            self._failed(model, e, api)
            raise


def request_keep_alive(text: str, config: ModelConfig) -> float:
    """Ollama's meaning: a request's keep_alive is how long the model stays after it; a request that
    gives none goes back to the model's own, so one client's keep_alive 0 does not stick for all."""
    return check_keep_alive(text) if text else config.keep_alive


def chat_history(messages, config: ModelConfig) -> tuple[list[pb.ChatMessage], int]:
    """The history as the model's settings want it: its system message first unless the request opens with one,
    reasoning stripped from earlier assistant turns (strip_thinking), the oldest turns beyond
    max_history_messages left out; and how many were."""
    history = [{"role": m.role, "content": m.content} for m in messages]
    if config.system and (not history or history[0]["role"] != "system"):  # the model's own, as Ollama's SYSTEM:
        history.insert(0, {"role": "system", "content": config.system})  # unless the chat opens with its own
    if config.strip_thinking:
        history = strip_thinking(history)
    dropped = 0
    if config.max_history_messages:
        history, dropped = drop_oldest(
            history, lambda kept: sum(m["role"] != "system" for m in kept) <= config.max_history_messages)
    return [pb.ChatMessage(**m) for m in history], dropped
