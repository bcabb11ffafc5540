"""OpenAI's API (/v1/…) over the daemon's request path: what the `openai` package, LangChain and editors send.

Fields this daemon cannot honour yet (`n` > 1, `tools`, `logprobs`, `logit_bias`, images) are refused
with a 400 that names them, never ignored. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from llm_supervisor.v1 import supervisor_pb2 as pb

from supervisor.api.http_errors import bad_request, unsupported
from supervisor.api.http_server import Frames, json_response, json_response_off_loop, read_body
from supervisor.api.inference import Inference

FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_END_OF_TEXT: "stop"}
JSON_OBJECT = '{"type": "object"}'  # response_format json_object: any JSON object, through the grammar
UINT32 = (1 << 32) - 1  # the protos' counts


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(Loose):
    type: str
    text: str = ""


class Message(Loose):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class JsonSchema(Loose):
    name: str = ""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(Loose):
    include_usage: bool = False


class Sampling(Loose):
    """What /v1/chat/completions and /v1/completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    # llama-server's extensions, which llama.cpp's clients send.
    top_k: int | None = Field(default=None, ge=0, le=UINT32)
    min_p: float | None = None
    repeat_penalty: float | None = None

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise unsupported("n", "one choice per request; send several requests")
        if self.logprobs:
            raise unsupported("logprobs")
        if self.logit_bias:
            raise unsupported("logit_bias")

    def options(self) -> pb.SamplingOptions:
        options = pb.SamplingOptions(max_tokens=self.max_completion_tokens or self.max_tokens or 0)
        for field in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "top_k", "min_p", "repeat_penalty"):
            if getattr(self, field) is not None:
                setattr(options, field, getattr(self, field))
        if self.seed is not None:
            options.seed = self.seed % (1 << 32)  # OpenAI's seeds are 64-bit; llama.cpp's sampler takes 32
        if self.stop:
            options.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message]
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    top_logprobs: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(Loose):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def chat_messages(messages: list[Message]) -> list[pb.ChatMessage]:
    out = []
    for i, message in enumerate(messages):
        if message.tool_calls:
            raise unsupported(f"messages[{i}].tool_calls", "tools are not supported yet")
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text":
                    raise unsupported(f"messages[{i}].content ({part.type})", "only text parts are")
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for it
        out.append(pb.ChatMessage(role=role, content=content or ""))
    return out


def response_format(request: ChatRequest, options: pb.SamplingOptions) -> None:
    rf = request.response_format
    if rf is None or rf.type == "text":
        return
    if rf.type == "json_object":
        options.json_schema = JSON_OBJECT
    elif rf.json_schema is None or rf.json_schema.schema_ is None:
        raise bad_request("response_format.json_schema.schema is required for type json_schema",
                          "response_format.json_schema")
    else:
        options.json_schema = json.dumps(rf.json_schema.schema_)


def usage(last: pb.GenerateChunk) -> dict:
    u = last.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


async def collect(chunks: AsyncIterator[pb.GenerateChunk]) -> tuple[str, pb.GenerateChunk]:
    text, last = [], pb.GenerateChunk()
    async for chunk in chunks:
        text.append(chunk.text)
        last = chunk
    return "".join(text), last


class OpenAI:
    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/models", self.models), web.get("/v1/models/{model:.+}", self.model),
                web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings)]

    async def _cards(self) -> list[dict]:
        """Every model there is: loaded, and on disk (read afresh), which the first request loads."""
        return [{"id": name, "object": "model", "created": gguf.modified_ns // 10**9, "owned_by": "llm-supervisor"}
                for name, gguf in await self.inference.catalog.known()]

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": await self._cards()})

    async def model(self, request: web.Request) -> web.Response:
        name = self.inference.catalog.resolve(request.match_info["model"])
        card = next((card for card in await self._cards() if card["id"] == name), None)
        if card is None:
            self.inference.registry.get(name)  # NOT_FOUND, naming what is loaded
        return json_response(card)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ChatRequest)
        body.refuse_unsupported()
        if body.tools or body.functions:
            raise unsupported("tools" if body.tools else "functions", "tool calling is not supported yet")
        if body.top_logprobs:
            raise unsupported("top_logprobs")
        options = body.options()
        response_format(body, options)
        chat = pb.ChatRequest(model=body.model, messages=chat_messages(body.messages), options=options)
        return await self._respond(request, body, self.inference.chat(chat, "openai"), "chat.completion", "chatcmpl")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, CompletionRequest)
        body.refuse_unsupported()
        if body.echo:
            raise unsupported("echo")
        if body.suffix:
            raise unsupported("suffix", "fill-in-the-middle is not supported")
        if body.best_of not in (None, 1):
            raise unsupported("best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise unsupported("prompt", f"one prompt per request, got {len(prompts)}")
        generate = pb.GenerateRequest(model=body.model, prompt=prompts[0], options=body.options())
        return await self._respond(request, body, self.inference.generate(generate, "openai"), "text_completion", "cmpl")

    async def _respond(self, request: web.Request, body: Sampling, chunks: AsyncIterator[pb.GenerateChunk],
                       kind: str, prefix: str) -> web.StreamResponse:
        chat = kind == "chat.completion"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": body.model}
        async with aclosing(chunks):
            if not body.stream:
                text, last = await collect(chunks)
                choice = ({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                return json_response({**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                                           "finish_reason": FINISH.get(last.finish_reason)}],
                                      "usage": usage(last)})
            # The first chunk before the headers: a full queue or an unknown model is still a 429 or a 404.
            first = await anext(chunks, None)
            frames = await Frames.start(request, sse=True)
            head["object"] = f"{kind}.chunk" if chat else kind
            extra = {"usage": None} if body.include_usage else {}

            def frame(text: str | None, finish: str | None, role: bool = False) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": text or ""} if role else {} if text is None else {"content": text}
                    choice = {"delta": delta}
                else:
                    choice = {"text": text or ""}
                return {**head, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}], **extra}

            if chat:
                await frames.send(frame("", None, role=True))
            # An error from here on (a worker that died mid-stream) becomes the last frame, an error event
            # the openai package raises (http_server's middleware writes it).
            last, chunk = None, first
            while chunk is not None:
                if chunk.text:
                    await frames.send(frame(chunk.text, None))
                last = chunk
                chunk = await anext(chunks, None)
            await frames.send(frame(None, FINISH.get(last.finish_reason) if last else None))
            if body.include_usage and last is not None:
                await frames.send({**head, "choices": [], "usage": usage(last)})
            return await frames.end()

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_body(request, EmbeddingRequest)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or not all(isinstance(item, str) for item in inputs):
            raise unsupported("input", "give text (a string or a list of strings), not token ids: they are another "
                                       "tokenizer's (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))") \
                if inputs else \
                bad_request("input is empty", "input")
        if body.dimensions is not None:
            size = (await self.inference.runtime(body.model)).gguf.shape.n_embd
            if body.dimensions != size:
                raise unsupported("dimensions", f"model {body.model!r} makes vectors of {size}, no other size")
        reply = await self.inference.embed(pb.EmbedRequest(model=body.model, input=inputs), "openai")
        return await json_response_off_loop(lambda: {
            "object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": encoded(e.values) if body.encoding_format == "base64" else list(e.values)}
                     for i, e in enumerate(reply.embeddings)],
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}})


def encoded(values) -> str:
    """encoding_format base64: little-endian float32s, what the openai package asks for by default."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
