"""Who may call what: bearer tokens in two roles, and the TLS credentials TCP listens with.

Roles: an `inference` token may generate, chat, tokenize and look (ListModels, Status, EstimateModel,
WatchEvents); an `admin` token may do all of that and change things (load, unload, recycle, restart,
start, stop, reload, tail the workers' logs). The health service and reflection are open: load
balancers and probes send no metadata. Tokens are read from files (never the command line, where
`ps` shows them), compared in constant time, and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from supervisor.settings.config import ConfigError, SupervisorConfig

INFERENCE, ADMIN = "inference", "admin"
SUPERVISOR_SERVICE = "/llm_supervisor.v1.Supervisor/"
INFERENCE_METHODS = frozenset({"Generate", "Chat", "Tokenize", "Embed", "ListModels", "Status", "EstimateModel",
                               "WatchEvents"})
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Tokens:
    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.inference or self.admin)


def required_role(method: str) -> str | None:
    """The role a full method name ("/package.Service/Method") needs; None for the open services."""
    if not method.startswith(SUPERVISOR_SERVICE):
        return None  # grpc.health.v1.Health, server reflection
    return INFERENCE if method[len(SUPERVISOR_SERVICE):] in INFERENCE_METHODS else ADMIN


def role_of(presented: bytes | None, tokens: Tokens) -> str | None:
    """The role of a presented token, or None. Every known token is compared, each in constant time,
    so the answer's timing says nothing about which one nearly matched."""
    if not presented:
        return None
    admin = any([hmac.compare_digest(presented, t) for t in tokens.admin])
    inference = any([hmac.compare_digest(presented, t) for t in tokens.inference])
    return ADMIN if admin else INFERENCE if inference else None


def permits(granted: str | None, needed: str) -> bool:
    return granted == ADMIN or granted == needed


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def token_lines(text: str) -> list[str]:
    """The tokens of a token file: one per line, blank lines and # comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_token_file(path: Path, role: str) -> tuple[bytes, ...]:
    """One token per line; blank lines and # comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"[auth] {role}_tokens_file {path}: {e.strerror}") from None
    tokens = tuple(t.encode() for t in token_lines("\n".join(lines)))
    if not tokens:
        raise ConfigError(f"[auth] {role}_tokens_file {path} holds no token")
    if any(len(t) < MIN_TOKEN_LENGTH for t in tokens):
        raise ConfigError(f"[auth] {role}_tokens_file {path}: tokens must be at least {MIN_TOKEN_LENGTH} characters "
                          f"(e.g. `openssl rand -hex 32`)")
    return tokens


def read_tokens(config: SupervisorConfig) -> Tokens:
    return Tokens(
        inference=read_token_file(config.inference_tokens_file, INFERENCE) if config.inference_tokens_file else (),
        admin=read_token_file(config.admin_tokens_file, ADMIN) if config.admin_tokens_file else (),
    )


def server_credentials(config: SupervisorConfig) -> grpc.ServerCredentials:
    """TLS with the [tls] files; with client_ca, clients must present a certificate it signed (mTLS)."""
    def read(path: Path, key: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise ConfigError(f"[tls] {key} {path}: {e.strerror}") from None

    assert config.tls_cert is not None and config.tls_key is not None
    ca = read(config.tls_client_ca, "client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(config.tls_key, "key"), read(config.tls_cert, "cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers every call with `code`."""
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED with one whose role is not enough.
    A reload replaces `tokens` (the token files read again) without a restart."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        tokens, needed = self.tokens, required_role(details.method)
        if handler is None or needed is None or not tokens.required:
            return handler
        granted = role_of(bearer(details.invocation_metadata), tokens)
        method = details.method.rsplit("/", 1)[-1]
        if granted is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "a valid bearer token is required: metadata 'authorization: Bearer <token>' "
                         "(llmctl --token-file FILE)")
        if not permits(granted, needed):
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                         f"{method} needs an {needed} token; this one is an {granted} token")
        return handler
