"""Errors over HTTP: one table from the gRPC status every part of the daemon raises to the HTTP status
OpenAI's and Ollama's clients act on, and each API's error body."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from supervisor.errors import ApiError, QueueFull

Code = grpc.StatusCode

# What clients do with each: the openai package raises BadRequestError for 400, AuthenticationError for
# 401, NotFoundError for 404, RateLimitError for 429 (and retries it, after Retry-After); the ollama
# package raises ResponseError with the status.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,  # e.g. a model file that is not GGUF, chat on an embedding model
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 503,  # a worker start the memory budgets cannot hold; a full queue is 429
    Code.CANCELLED: 499,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,  # the model is FATAL, stopped, too hot, or its worker died mid-request
    Code.DEADLINE_EXCEEDED: 504,
}

# OpenAI's error `type` by status, as llama-server and vLLM name them.
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                501: "not_supported_error", 503: "unavailable_error"}
OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}

RETRY_AFTER_S = 1  # a full queue usually has room again within a request's time


@dataclass
class HttpError(Exception):
    status: int
    message: str
    param: str | None = None  # the request field at fault, where one is

    @classmethod
    def of(cls, error: ApiError) -> HttpError:
        return cls(429 if isinstance(error, QueueFull) else HTTP_STATUS.get(error.code, 500), error.message)

    def headers(self) -> dict[str, str]:
        if self.status == 429:
            return {"Retry-After": str(RETRY_AFTER_S)}
        if self.status in (500, 504):
            # The openai package retries these twice by itself: a request that ran past request_timeout
            # would run three times over.
            return {"x-should-retry": "false"}
        return {}

    def openai(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}, as api.openai.com answers."""
        return {"error": {"message": self.message, "type": OPENAI_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": OPENAI_CODES.get(self.status, str(self.status))}}

    def ollama(self) -> dict:
        return {"error": self.message}


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param)


def unsupported(field: str, why: str = "") -> HttpError:
    """A field this daemon cannot honour yet: refused by name rather than ignored."""
    return HttpError(400, f"{field} is not supported{': ' + why if why else ''}", field)
