from llm_supervisor.v1 import supervisor_pb2 as _supervisor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("prompt", "chat", "options", "max_prompt_tokens", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: _supervisor_pb2.ChatRequest
    options: _supervisor_pb2.SamplingOptions
    max_prompt_tokens: int
    request_id: int
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[_supervisor_pb2.ChatRequest, _Mapping]] = ..., options: _Optional[_Union[_supervisor_pb2.SamplingOptions, _Mapping]] = ..., max_prompt_tokens: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class ReleasedRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class ReleasedReply(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: bool
    def __init__(self, freed: _Optional[bool] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WarmUpRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("pid", "n_ctx", "n_batch", "n_threads", "requests_served", "architecture", "has_chat_template", "parallel", "pool", "embedding")
    PID_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    N_BATCH_FIELD_NUMBER: _ClassVar[int]
    N_THREADS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    pid: int
    n_ctx: int
    n_batch: int
    n_threads: int
    requests_served: int
    architecture: str
    has_chat_template: bool
    parallel: int
    pool: _supervisor_pb2.PoolStatus
    embedding: bool
    def __init__(self, pid: _Optional[int] = ..., n_ctx: _Optional[int] = ..., n_batch: _Optional[int] = ..., n_threads: _Optional[int] = ..., requests_served: _Optional[int] = ..., architecture: _Optional[str] = ..., has_chat_template: _Optional[bool] = ..., parallel: _Optional[int] = ..., pool: _Optional[_Union[_supervisor_pb2.PoolStatus, _Mapping]] = ..., embedding: _Optional[bool] = ...) -> None: ...
