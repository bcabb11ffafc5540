"""The HTTP server that the OpenAI- and Ollama-compatible APIs share: aiohttp on the daemon's own event
loop, in front of the same request path as the gRPC service (inference.py), never a gRPC hop.

What every request passes here, in order: the access log (and the `api` label on every log line the
request causes), the guard against web pages (Origin, Host) and CORS, errors in the caller's API's
shape, bearer tokens (the gRPC API's, same roles).
Bodies are read through `read_body`: bounded by max_message_size (413), parsed as JSON (400 with the
parser's reason) and validated by a pydantic model (400 naming the field). A client that disconnects
cancels its handler (handler_cancellation), and with it the worker's sequence.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
from typing import Any, Awaitable, Callable, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from supervisor.api.http_errors import HttpError, bad_request
from supervisor.errors import ApiError
from supervisor.server.security import ADMIN, INFERENCE, Tokens, bearer, permits, role_of
from supervisor.settings.config import ConfigError, SupervisorConfig, split_host_port

log = structlog.get_logger("llm_supervisor.http")

Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/", "/api/version"})  # what probes and Open WebUI's connection check call
ADMIN_PATHS = frozenset({"/api/delete"})


def api_of(path: str) -> str:
    return "openai" if path.startswith("/v1/") or path == "/v1" else "ollama"


def required_role(method: str, path: str) -> str | None:
    if method == "OPTIONS" or path in OPEN_PATHS:
        return None
    return ADMIN if path in ADMIN_PATHS else INFERENCE


async def read_body(request: web.Request, model: type[Model]) -> Model:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, f"the request body is larger than max_message_size ({request.app['max_body']} "
                             f"bytes; [supervisor] max_message_size)") from None
    try:
        data = json.loads(raw or b"{}")
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise bad_request(f"{field + ': ' if field else ''}{first['msg']}", field) from None


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers=headers, content_type="application/json")


def dumps_in_pieces(value: Any) -> bytes:
    """JSON in many small encoder calls, one per vector: the C encoder holds the GIL for a whole call,
    so a single call over tens of MB would stop the event loop's thread however it was started."""
    if isinstance(value, dict):
        return b"{" + b",".join(dumps(str(k)) + b":" + dumps_in_pieces(v) for k, v in value.items()) + b"}"
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        return b"[" + b",".join(dumps_in_pieces(item) for item in value) + b"]"
    return dumps(value)


async def json_response_off_loop(make: Callable[[], Any]) -> web.Response:
    """For replies that may be tens of MB (2,048 vectors of 4,096 floats): built and encoded on a thread,
    a vector at a time, so every stream and the watch loop go on meanwhile."""
    body = await asyncio.to_thread(lambda: dumps_in_pieces(make()))
    return web.Response(body=body, content_type="application/json")


class Frames:
    """A streamed response: server-sent events (OpenAI: `data: {…}` and a last `data: [DONE]`) or
    newline-delimited JSON (Ollama). Each frame is written (and so flushed) as it comes."""

    def __init__(self, response: web.StreamResponse, sse: bool) -> None:
        self.response = response
        self.sse = sse

    @classmethod
    async def start(cls, request: web.Request, sse: bool) -> Frames:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream" if sse else "application/x-ndjson",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a reverse proxy in front (nginx) must not hold frames back
            **request.get("cors", {}),  # sent with the first frame: the CORS middleware comes too late
        })
        await response.prepare(request)
        request["frames"] = frames = cls(response, sse)
        return frames

    async def send(self, body: Any) -> None:
        await self.response.write(b"data: " + dumps(body) + b"\n\n" if self.sse else dumps(body) + b"\n")

    async def end(self, done: bool = True) -> web.StreamResponse:
        """`done`: the SSE stream's `data: [DONE]`; left out after an error event, as OpenAI does."""
        if self.sse and done:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


class HttpApi:
    """The server: built from the config, started on the running loop, stopped with the daemon."""

    def __init__(self, config: SupervisorConfig, tokens: Callable[[], Tokens], routes: list[web.RouteDef]) -> None:
        self.config = config
        self._tokens = tokens  # read per request: a reload replaces the token files' contents
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=config.max_message_size,
                                    middlewares=[self._logged, self._browsers, self._errors, self._auth])
        self.app["max_body"] = config.max_message_size
        self._loopback = is_loopback(split_host_port(config.http_address, any_port=True)[0])
        self.app.add_routes(routes)

    async def start(self) -> str:
        """Listen on [http] address; the address bound (the port filled in where it was 0)."""
        sock = bind(self.config)
        try:
            context = tls_context(self.config) if self.config.http_tls else None
            # Past shutdown_timeout the registry fails what is still queued: handlers end by then.
            self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                         shutdown_timeout=self.config.shutdown_timeout + 10)
            await self._runner.setup()
            await web.SockSite(self._runner, sock, ssl_context=context).start()
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        """No new connection from now; requests in flight finish (or fail with the drain's reason)."""
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what every request passes -------------------------------------------------------------------
    @web.middleware
    async def _logged(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        api = api_of(request.path)
        started = time.monotonic()
        status = 500
        with structlog.contextvars.bound_contextvars(api=api):
            try:
                response = await handler(request)
                status = response.status
                return response
            except BaseException:
                status = 499  # the client went away (the handler was cancelled), as nginx counts it
                raise
            finally:
                log.info("http_request", method=request.method, path=request.path, status=status,
                         duration_ms=round((time.monotonic() - started) * 1000, 1), remote=request.remote)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            error = HttpError.of(e)
        except HttpError as e:
            error = e
        except web.HTTPException as e:  # aiohttp's own: no such route (404), method (405), body too large
            if e.status < 400:
                raise
            error = HttpError(e.status, f"{request.method} {request.path}: {e.reason}")
        except ConnectionResetError:  # written to a client that had gone: nobody to answer
            return web.Response(status=499)
        except Exception:
            log.exception("http_handler_failed", method=request.method, path=request.path)
            error = HttpError(500, "internal error; the daemon's log has the details")
        frames: Frames | None = request.get("frames")
        if frames is not None:
            # Mid-stream, the status has gone out: the error is the last frame, which clients raise,
            # rather than a stream that merely stops.
            await frames.send(body_of(request, error))
            return await frames.end(done=False)
        return render(request, error)

    @web.middleware
    async def _browsers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """What keeps web pages out, as Ollama does: a browser sends any page's requests here, preflight or
        not (a text/plain POST needs none), so an Origin that is not allowed is refused outright rather
        than only denied the reply; and on loopback a Host that is not this machine is refused, which a
        page that rebinds its DNS name to 127.0.0.1 cannot help sending. CORS headers go to allowed origins."""
        host = request.headers.get("Host")  # as sent: aiohttp fills a missing one in from the socket
        if self._loopback and not local_host(host):
            return render(request, HttpError(403, f"Host {host!r} is not this machine: the HTTP API listens on "
                                                  f"loopback and answers requests addressed to it only (a proxy in "
                                                  f"front: send Host localhost)"))
        origins = self.config.cors_origins
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, origins):
            return render(request, HttpError(403, f"origin {origin!r} is not allowed: add it to [http] cors_origins"))
        if request.method == "OPTIONS" and origin is not None and request.headers.get("Access-Control-Request-Method"):
            return web.Response(status=204, headers={
                **cors_headers(origin, origins),
                "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600",
            })
        if origin is not None:
            # Set before the handler runs: a streamed response sends its headers with its first frame.
            request["cors"] = cors_headers(origin, origins)
        response = await handler(request)
        if origin is not None and not response.prepared:
            response.headers.update(request["cors"])
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        tokens, needed = self._tokens(), required_role(request.method, request.path)
        if needed is None or not tokens.required:
            return await handler(request)
        granted = role_of(bearer([("authorization", request.headers.get("Authorization", ""))]), tokens)
        if granted is None:
            raise HttpError(401, "a valid bearer token is required: header 'Authorization: Bearer <token>' "
                                 "(OpenAI clients: api_key; Ollama clients: headers)")
        if not permits(granted, needed):
            raise HttpError(403, f"{request.method} {request.path} needs an {needed} token; this one is an "
                                 f"{granted} token")
        return await handler(request)


def body_of(request: web.Request, error: HttpError) -> dict:
    return error.openai() if api_of(request.path) == "openai" else error.ollama()


def render(request: web.Request, error: HttpError) -> web.Response:
    """The error in the shape of the API the request was for."""
    return json_response(body_of(request, error), error.status, error.headers())


# Origins a browser on this machine sends, allowed by default as Ollama allows them: local web UIs,
# desktop apps and editors (Electron's app://, Tauri, VS Code's webviews).
LOCAL_ORIGIN = re.compile(r"(https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?"
                          r"|(app|file|tauri|vscode-webview|vscode-file)://.*)")


def origin_allowed(origin: str, configured: tuple[str, ...]) -> bool:
    """This machine's own origins, or one the config allows; `*` in a configured origin matches anything,
    as in OLLAMA_ORIGINS (`chrome-extension://*`, `https://*.example.com`), and nothing else is special
    (an IPv6 origin's brackets are brackets)."""
    origin = origin.lower()
    return LOCAL_ORIGIN.fullmatch(origin) is not None or any(
        re.fullmatch(".*".join(map(re.escape, o.lower().split("*"))), origin) for o in configured)


def local_host(host: str | None) -> bool:
    """Whether a Host header names this machine: localhost, a loopback address or its own hostname, any port."""
    if not host:
        return True  # HTTP/1.0 sends none: no browser does that
    host = host.lower()
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rpartition(":")[0] or host
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name == socket.gethostname().lower():
        return True
    return is_loopback(name)


def cors_headers(origin: str, origins: tuple[str, ...]) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": "*" if "*" in origins else origin, "Vary": "Origin"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def bind(config: SupervisorConfig) -> socket.socket:
    """The listening socket for [http] address. Plaintext is for this machine only unless the config
    writes out `insecure = true` in [http]; an address in use is an error that names the key."""
    address = config.http_address
    host, port = split_host_port(address, any_port=True)
    if not config.http_tls and not config.http_insecure and not is_loopback(host):
        raise ConfigError(f"[http] address {address} is reachable from other machines: give [tls] cert and key, "
                          f"or write insecure = true in [http] to serve plaintext HTTP on it")
    if not config.http_tls and config.http_insecure and not is_loopback(host):
        log.critical("insecure_http", address=address,
                     reason="[http] insecure = true: the HTTP API listens without TLS; anyone on the network can "
                            "read prompts and replies")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ConfigError(f"[http] address {address}: cannot listen ({e.strerror}); is Ollama or another daemon "
                          f"on it? Set [http] address, or --http-address '' to serve no HTTP") from None
    # Frames are small and each must go at once: Nagle's algorithm would hold one back until the client
    # acknowledged the last, which delayed ACKs make up to 200 ms. Accepted sockets inherit it on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls_context(config: SupervisorConfig) -> ssl.SSLContext:
    """The [tls] files, as the gRPC listener uses them; with client_ca, a client certificate is required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[tls] files for [http]: {e}") from None
    return context
