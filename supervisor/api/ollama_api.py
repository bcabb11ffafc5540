"""Ollama's API (/api/…) over the daemon's request path: what Open WebUI, the `ollama` package and the
editors that speak Ollama send, answered as Ollama answers.

Where this daemon differs on purpose (docs/decisions.md, "HTTP APIs"): options that Ollama bakes into
its runner (num_ctx, num_gpu, num_thread …) never reload a model — they are ignored, with a log line
naming them, and the model keeps the operator's settings; /api/delete unloads and deletes no file;
pull, push, create and copy answer 501 with how models get here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from contextlib import aclosing
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from llm_supervisor.v1 import supervisor_pb2 as pb

from supervisor.api.http_errors import HttpError, bad_request, unsupported
from supervisor.api.http_server import Frames, json_response, json_response_off_loop, read_body
from supervisor.api.inference import Inference, request_keep_alive
from supervisor.api.validation import check_keep_alive
from supervisor.api.openai_api import FINISH, JSON_OBJECT
from supervisor.api.thinking import ThinkSplit, opens_thinking
from supervisor.serving.runtime import ModelRuntime
from supervisor.settings.config import ModelConfig
from supervisor.settings.gguf_file import GGUFInfo

log = structlog.get_logger("llm_supervisor.ollama")

# The Ollama API version whose behaviour this follows; Open WebUI parses it as a dotted number.
OLLAMA_VERSION = "0.12.0"
NOT_HERE = ("llm-supervisor does not download or build models: put a GGUF file in a model directory "
            "([supervisor] model_dirs) and load it with `llmctl load NAME FILE`, or name it in [models.NAME]")
NUMBER_OPTIONS = ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty")
UINT32 = (1 << 32) - 1
FOREVER = "9999-12-31T23:59:59Z"
IGNORED_LOGGED = 1024  # distinct (model, ignored options) pairs logged before the memory of them starts over


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Request(Loose):
    model: str
    options: dict[str, Any] | None = None
    keep_alive: str | float | bool | None = None  # bool kept as given, to be refused by name
    format: str | dict[str, Any] | None = None
    stream: bool = True
    think: bool | str | None = None


class GenerateBody(Request):
    prompt: str = ""
    system: str = ""
    suffix: str = ""
    template: str = ""
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None


class Message(Loose):
    role: str
    content: str | None = ""  # null from some clients for an assistant turn that only called tools
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(Request):
    messages: list[Message] = []
    tools: list[Any] | None = None


class EmbedBody(Loose):
    model: str
    input: str | list[str] = []
    truncate: bool = True  # Ollama's default: an input longer than the context is cut to fit
    keep_alive: str | float | bool | None = None
    dimensions: int | None = None


class LegacyEmbedBody(Loose):
    model: str
    prompt: str = ""
    keep_alive: str | float | bool | None = None


class NameBody(Loose):
    model: str = ""
    name: str = ""  # Ollama's older spelling

    @property
    def which(self) -> str:
        return self.model or self.name


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def tagged(name: str) -> str:
    """Ollama's names carry a tag: `demo` is listed as `demo:latest`."""
    return name if ":" in name else f"{name}:latest"


GO_DURATION = re.compile(r"((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_text(value: str | float | None) -> str:
    """Ollama's keep_alive as ours: seconds as a number, or a Go duration ("5m", "1h30m", "5m0s" — how Go
    prints them), any negative meaning forever. What is neither is passed on for the usual check to refuse."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        raise bad_request(f"keep_alive must be a duration or a number of seconds, got {value!r}", "keep_alive")
    if isinstance(value, (int, float)):
        return "-1" if value < 0 else f"{float(value):f}"
    text = str(value).strip().replace("\u03bc", "µ")  # Go takes the Greek mu as well as the micro sign
    sign, rest = ("-", text[1:]) if text.startswith("-") else ("", text)
    if GO_DURATION.fullmatch(rest):
        seconds = sum(float(n) * GO_UNITS[unit] for n, _, _, unit in
                      re.findall(r"((\d+(\.\d*)?|\.\d+))(ns|us|µs|ms|s|m|h)", rest))
        rest = f"{seconds:f}"
    if sign:  # any negative is forever; "-0s" is 0, as in Go; nonsense after the sign is left to be refused
        return rest if rest.replace(".", "", 1).isdigit() and float(rest) == 0 else \
            "-1" if rest.replace(".", "", 1).isdigit() else text
    return rest


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def whole(key: str, value: Any) -> int:
    """An integer option: JSON numbers with no fraction, finite (the parser takes NaN and Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise bad_request(f"options.{key} must be a whole number, got {value!r}", f"options.{key}")
    return int(value)


def sampling(options: dict[str, Any] | None, fmt: str | dict | None) -> tuple[pb.SamplingOptions, list[str]]:
    """Ollama's options as ours, and the keys that have no effect here (runner settings, mirostat …).
    Ranges are checked where every API's are (validation.check_options); here, only what a field holds."""
    out, ignored = pb.SamplingOptions(), []
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key == "seed":
            seed = whole(key, value)
            if seed >= 0:  # negative: a random seed, as Ollama does
                out.seed = seed % (1 << 32)
        elif key == "num_predict":
            out.max_tokens = min(max(whole(key, value), 0), UINT32)  # -1 (no limit), -2 (fill the context): 0
        elif key == "top_k":
            top_k = whole(key, value)
            if not 0 <= top_k <= UINT32:
                raise bad_request(f"options.top_k must be 0 (off) or more, got {top_k}", "options.top_k")
            out.top_k = top_k
        elif key in NUMBER_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad_request(f"options.{key} must be a number, got {value!r}", f"options.{key}")
            setattr(out, key, value)  # NaN, ±inf and out-of-range values are refused by check_options
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise bad_request("options.stop must be a list of strings", "options.stop")
            out.stop.extend(stops)
        else:
            ignored.append(key)
    if fmt == "json":
        out.json_schema = JSON_OBJECT
    elif isinstance(fmt, dict):
        out.json_schema = json.dumps(fmt)
    elif fmt:
        raise bad_request(f'format must be "json" or a JSON schema, got {fmt!r}', "format")
    return out, ignored


def parameters(config: ModelConfig) -> str:
    """The settings a request gets unless it says otherwise, as Ollama's /api/show writes a Modelfile's
    PARAMETER lines."""
    lines = [f"num_ctx {config.n_ctx}", *(f"stop {json.dumps(stop)}" for stop in config.stop)]
    for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        if getattr(config, key) is not None:
            lines.append(f"{key} {getattr(config, key):g}")
    return "\n".join(lines)


def stats(last: pb.GenerateChunk, started: float) -> dict:
    """The closing line's figures, in nanoseconds. The worker's time splits into prompt evaluation (up
    to the first token) and generation; load_duration is the wait for the model's worker to load (0 when
    it was ready), as Ollama counts it."""
    total = time.monotonic() - started
    t = last.timings
    return {"total_duration": int(total * 1e9), "load_duration": int(last.usage.load_s * 1e9),
            "prompt_eval_count": last.usage.prompt_tokens, "prompt_eval_duration": int(t.time_to_first_token_s * 1e9),
            "eval_count": last.usage.completion_tokens,
            "eval_duration": int(max(t.total_s - t.time_to_first_token_s, 0.0) * 1e9)}


def digest(gguf: GGUFInfo) -> str:
    """A stable stand-in for Ollama's manifest digest, cheap on a file of many GB: path, size, mtime."""
    return hashlib.sha256(f"{gguf.path}:{gguf.file_size}:{gguf.modified_ns}".encode()).hexdigest()


def expires_at(seconds: float) -> str:
    """`until` seconds from now in ISO 8601; -1 (keep_alive forever) and past year 9999 are Ollama's far date."""
    try:
        return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat() if seconds >= 0 else FOREVER
    except OverflowError:
        return FOREVER


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat()


def details(gguf: GGUFInfo) -> dict:
    return {"parent_model": "", "format": "gguf", "family": gguf.architecture, "families": [gguf.architecture],
            "parameter_size": human_count(gguf.parameter_count), "quantization_level": gguf.file_type}


class Ollama:
    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        self._ignored_logged: set[tuple[str, tuple[str, ...]]] = set()

    @property
    def registry(self):
        return self.inference.registry

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.root), web.get("/api/version", self.version), web.get("/api/tags", self.tags),
                web.get("/api/ps", self.ps), web.post("/api/show", self.show), web.post("/api/generate", self.generate),
                web.post("/api/chat", self.chat), web.post("/api/embed", self.embed),
                web.post("/api/embeddings", self.legacy_embed), web.delete("/api/delete", self.delete),
                *(web.post(f"/api/{verb}", self.not_here) for verb in ("pull", "push", "create", "copy")),
                web.route("*", "/api/blobs/{digest}", self.not_here)]

    async def runtime(self, name: str) -> ModelRuntime:
        return await self.inference.runtime(name)

    async def described(self, name: str) -> tuple[GGUFInfo, ModelConfig]:
        """A model's header and settings, loaded or only on disk (nothing is loaded to tell)."""
        name = self.inference.catalog.resolve(name)
        if name not in self.registry.models:
            for model, header, config in await self.inference.catalog.listing():
                if model.name == name and header is not None and config is not None:
                    return header, config
        runtime = self.registry.get(name)  # NOT_FOUND, listing what there is
        return runtime.gguf, runtime.config

    @staticmethod
    def tag(name: str, gguf: GGUFInfo) -> dict:
        return {"name": tagged(name), "model": tagged(name), "modified_at": iso(gguf.modified_ns),
                "size": gguf.file_size, "digest": digest(gguf), "details": details(gguf)}

    # -- looking -------------------------------------------------------------------------------------
    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")  # what Ollama's clients look for; /api/version says who

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": OLLAMA_VERSION})

    async def tags(self, request: web.Request) -> web.Response:
        """Every model there is: loaded, and on disk (read afresh)."""
        return json_response({"models": [self.tag(name, gguf) for name, gguf in await self.inference.catalog.known()]})

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for runtime in list(self.registry.models.values()):
            live = [replica for replica in runtime.replicas if replica.serving]  # not one draining to unload
            if not live:
                continue
            until = max(replica.unload_in() for replica in live) if all(r.unload_in() >= 0 for r in live) else -1
            expires = expires_at(until)
            e = runtime.estimate
            models.append({"name": tagged(runtime.name), "model": tagged(runtime.name),
                           "size": e.weights_mapped + e.total_private + e.total_gpu, "size_vram": e.total_gpu,
                           "digest": digest(runtime.gguf), "details": details(runtime.gguf), "expires_at": expires,
                           "context_length": runtime.config.n_ctx})
        return json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        body = await read_body(request, NameBody)
        gguf, config = await self.described(body.which)
        arch = gguf.architecture
        info = {"general.architecture": arch, "general.name": gguf.name, "general.parameter_count": gguf.parameter_count,
                f"{arch}.context_length": gguf.n_ctx_train, f"{arch}.block_count": gguf.n_layer,
                f"{arch}.embedding_length": gguf.shape.n_embd}
        return json_response({
            # The file's name, not its path: inference clients have no business with the server's layout.
            "license": "", "modelfile": f"# served by llm-supervisor\nFROM {gguf.path.name}\n",
            # What this daemon runs it with: the operator's settings, not the file's maximum.
            "parameters": parameters(config), "template": gguf.chat_template, "details": details(gguf),
            **({"system": config.system} if config.system else {}),
            "model_info": info, "capabilities": ["embedding"] if config.embedding else ["completion"],
            "modified_at": iso(gguf.modified_ns)})

    # -- generating ----------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, GenerateBody)
        for field in ("suffix", "template", "images", "context"):
            if getattr(body, field):
                raise unsupported(field, {"suffix": "fill-in-the-middle is not supported",
                                          "template": "the model's own chat template is used",
                                          "images": "this daemon serves text models",
                                          "context": "send the conversation with /api/chat"}[field])
        if not body.prompt and not body.system:
            return await self._load_or_unload(body, {"response": ""})
        arrived = time.monotonic()  # its load on demand, if any, is its load_duration
        runtime = await self.runtime(body.model)
        options = self._options(runtime, body)
        if body.raw:
            chunks = self.inference.generate(pb.GenerateRequest(model=runtime.name, prompt=body.prompt, options=options,
                                                                keep_alive=keep_alive_text(body.keep_alive)), "ollama",
                                             arrived)
        else:  # as Ollama: the prompt is the user's turn in the model's chat template
            messages = ([pb.ChatMessage(role="system", content=body.system)] if body.system else []) + \
                       [pb.ChatMessage(role="user", content=body.prompt)]
            chunks = self.inference.chat(pb.ChatRequest(model=runtime.name, messages=messages, options=options,
                                                        keep_alive=keep_alive_text(body.keep_alive)), "ollama",
                                         arrived)
        return await self._respond(request, body, chunks, lambda text, thinking: {
            "response": text, **({"thinking": thinking} if thinking else {})},
            template="" if body.raw else runtime.gguf.chat_template)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ChatBody)
        if body.tools:
            raise unsupported("tools", "tool calling is not supported yet")
        if not body.messages:
            return await self._load_or_unload(body, {"message": {"role": "assistant", "content": ""}})
        arrived = time.monotonic()
        runtime = await self.runtime(body.model)
        for i, message in enumerate(body.messages):
            if message.images:
                raise unsupported(f"messages[{i}].images", "this daemon serves text models")
            if message.tool_calls:
                raise unsupported(f"messages[{i}].tool_calls", "tool calling is not supported yet")
        chat = pb.ChatRequest(model=runtime.name, options=self._options(runtime, body),
                              messages=[pb.ChatMessage(role=m.role, content=m.content or "") for m in body.messages],
                              keep_alive=keep_alive_text(body.keep_alive))
        return await self._respond(request, body, self.inference.chat(chat, "ollama", arrived), lambda text, thinking: {
            "message": {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}},
            template=runtime.gguf.chat_template)

    def _options(self, runtime: ModelRuntime, body: Request) -> pb.SamplingOptions:
        options, ignored = sampling(body.options, body.format)
        if ignored:
            key = (runtime.name, tuple(sorted(ignored)))
            if key not in self._ignored_logged:
                if len(self._ignored_logged) >= IGNORED_LOGGED:
                    self._ignored_logged.clear()
                self._ignored_logged.add(key)
                log.info("ollama_options_ignored", model=runtime.name, options=sorted(ignored),
                         reason="runner settings come from the config ([models.NAME]) and never reload a model; "
                                "the rest have no counterpart here")
        return options

    async def _load_or_unload(self, body: Request, empty: dict) -> web.Response:
        """Ollama's empty request: load the model (a worker ready on each replica), or with keep_alive 0
        unload it (once the requests in flight are done) — never loading it to do so (`ollama stop`)."""
        text = keep_alive_text(body.keep_alive)
        if text and check_keep_alive(text) == 0:
            name = await self.inference.catalog.found(body.model)
            runtime = self.registry.models.get(name)
            if runtime is None:  # not loaded: nothing to unload, but an unknown name is still NOT_FOUND
                if name not in self.inference.catalog.scanner.last.models:
                    self.registry.get(name)  # NOT_FOUND, naming what there is
                return json_response({"model": body.model, "created_at": now_iso(), **empty, "done": True,
                                      "done_reason": "unload"})
        else:
            runtime = await self.runtime(body.model)
        seconds = request_keep_alive(text, runtime.config)
        runtime.keep_alive(seconds)
        if seconds == 0:
            for replica in runtime.replicas:
                replica.watchdog.unload_if_idle()
            reason = "unload"
        else:
            await runtime.warm()
            reason = "load"
        return json_response({"model": body.model, "created_at": now_iso(), **empty, "done": True, "done_reason": reason})

    async def _respond(self, request: web.Request, body: Request, chunks: AsyncIterator[pb.GenerateChunk],
                       shape, template: str) -> web.StreamResponse:
        """`template`: the chat template the prompt was made with ("" for none), which may have opened the
        reasoning itself (opens_thinking: rendered once per template, on a thread)."""
        started = time.monotonic()
        split = ThinkSplit(await asyncio.to_thread(opens_thinking, template)) if body.think else None

        def line(text: str, last: pb.GenerateChunk | None = None) -> dict:
            thinking, content = split.feed(text) if split else ("", text)
            if last is not None and split:
                more_thinking, more_content = split.end()
                thinking, content = thinking + more_thinking, content + more_content
            done = {"done": True, "done_reason": FINISH.get(last.finish_reason, "stop"), **stats(last, started)} \
                if last is not None else {"done": False}
            return {"model": body.model, "created_at": now_iso(), **shape(content, thinking), **done}

        async with aclosing(chunks):
            if not body.stream:
                text, last = [], pb.GenerateChunk()
                async for chunk in chunks:
                    text.append(chunk.text)
                    last = chunk
                return json_response(line("".join(text), last))
            first = await anext(chunks, None)  # before the headers: a 404 or a 429 is still one
            frames = await Frames.start(request, sse=False)
            # An error from here on becomes the last line, {"error": …}, which the ollama package raises as
            # ResponseError (http_server's middleware writes it).
            chunk = first
            while chunk is not None:
                if chunk.text:
                    await frames.send(line(chunk.text))  # at once: a line held for the next costs a token's time
                if chunk.HasField("usage"):  # the last: a line of its own, done, with the figures, as Ollama's
                    await frames.send(line("", chunk))
                chunk = await anext(chunks, None)
            return await frames.end()

    # -- embeddings ----------------------------------------------------------------------------------
    async def embed(self, request: web.Request) -> web.Response:
        body = await read_body(request, EmbedBody)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        started = time.monotonic()
        if not inputs or inputs == [""]:  # as Ollama: nothing to embed loads the model
            await self._load_or_unload(body, {})
            return json_response({"model": body.model, "embeddings": []})
        runtime = await self.runtime(body.model)
        if body.dimensions is not None and body.dimensions != runtime.gguf.shape.n_embd:
            raise unsupported("dimensions", f"model {body.model!r} makes vectors of {runtime.gguf.shape.n_embd}")
        reply = await self.inference.embed(pb.EmbedRequest(model=runtime.name, input=inputs, truncate=body.truncate,
                                                           keep_alive=keep_alive_text(body.keep_alive)), "ollama")
        total = time.monotonic() - started
        return await json_response_off_loop(lambda: {
            "model": body.model, "embeddings": [list(e.values) for e in reply.embeddings],
            "total_duration": int(total * 1e9), "load_duration": int(max(total - reply.total_s, 0.0) * 1e9),
            "prompt_eval_count": reply.prompt_tokens})

    async def legacy_embed(self, request: web.Request) -> web.Response:
        body = await read_body(request, LegacyEmbedBody)
        if not body.prompt:  # as Ollama: nothing to embed loads the model
            await self._load_or_unload(body, {})
            return json_response({"embedding": []})
        runtime = await self.runtime(body.model)
        reply = await self.inference.embed(pb.EmbedRequest(model=runtime.name, input=[body.prompt], truncate=True,
                                                           keep_alive=keep_alive_text(body.keep_alive)), "ollama")
        return json_response({"embedding": list(reply.embeddings[0].values)})

    # -- changing ------------------------------------------------------------------------------------
    async def delete(self, request: web.Request) -> web.Response:
        body = await read_body(request, NameBody)
        name = self.inference.catalog.resolve(body.which)
        await self.registry.unload(name)  # the file stays: this daemon never deletes a model
        log.info("model_unloaded", model=name, source="ollama /api/delete")
        return web.Response(status=200)

    async def not_here(self, request: web.Request) -> web.Response:
        raise HttpError(501, NOT_HERE)


