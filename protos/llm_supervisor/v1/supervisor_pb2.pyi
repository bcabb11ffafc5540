from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_END_OF_TEXT: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_END_OF_TEXT: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class SamplingOptions(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop", "frequency_penalty", "presence_penalty", "grammar", "json_schema")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    frequency_penalty: float
    presence_penalty: float
    grammar: str
    json_schema: str
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., grammar: _Optional[str] = ..., json_schema: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "options", "keep_alive")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    options: SamplingOptions
    keep_alive: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[SamplingOptions, _Mapping]] = ..., keep_alive: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("model", "messages", "options", "keep_alive")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    options: SamplingOptions
    keep_alive: str
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., options: _Optional[_Union[SamplingOptions, _Mapping]] = ..., keep_alive: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "messages_dropped", "load_s")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    messages_dropped: int
    load_s: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., messages_dropped: _Optional[int] = ..., load_s: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("time_to_first_token_s", "tokens_per_second", "total_s")
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    time_to_first_token_s: float
    tokens_per_second: float
    total_s: float
    def __init__(self, time_to_first_token_s: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason", "usage", "timings", "model", "worker_pid")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str
    worker_pid: int
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model: _Optional[str] = ..., worker_pid: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text", "add_special")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    add_special: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., add_special: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens", "count", "n_ctx")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    count: int
    n_ctx: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., count: _Optional[int] = ..., n_ctx: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "input", "truncate", "keep_alive")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: _containers.RepeatedScalarFieldContainer[str]
    truncate: bool
    keep_alive: str
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Iterable[str]] = ..., truncate: _Optional[bool] = ..., keep_alive: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "prompt_tokens", "worker_pid", "total_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    prompt_tokens: int
    worker_pid: int
    total_s: float
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., worker_pid: _Optional[int] = ..., total_s: _Optional[float] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "path", "state", "n_ctx", "n_gpu_layers", "use_mmap", "source", "architecture", "file_size_bytes", "has_chat_template", "estimate", "memory_lines", "embedding", "quantization", "context_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    N_GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    USE_MMAP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LINES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    state: str
    n_ctx: int
    n_gpu_layers: int
    use_mmap: bool
    source: str
    architecture: str
    file_size_bytes: int
    has_chat_template: bool
    estimate: MemoryEstimate
    memory_lines: MemoryLines
    embedding: bool
    quantization: str
    context_length: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., state: _Optional[str] = ..., n_ctx: _Optional[int] = ..., n_gpu_layers: _Optional[int] = ..., use_mmap: _Optional[bool] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., file_size_bytes: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., estimate: _Optional[_Union[MemoryEstimate, _Mapping]] = ..., memory_lines: _Optional[_Union[MemoryLines, _Mapping]] = ..., embedding: _Optional[bool] = ..., quantization: _Optional[str] = ..., context_length: _Optional[int] = ...) -> None: ...

class MemoryEstimate(_message.Message):
    __slots__ = ("n_ctx", "replicas", "weights_mapped_bytes", "weights_private_bytes", "weights_gpu_bytes", "kv_cache_cpu_bytes", "kv_cache_gpu_bytes", "compute_cpu_at_load_bytes", "compute_cpu_peak_bytes", "compute_gpu_bytes", "runtime_bytes", "gpu_runtime_bytes", "private_at_load_bytes", "private_peak_bytes", "gpu_bytes", "total_private_bytes", "total_gpu_bytes", "weights_repacked_bytes", "outputs_bytes", "parallel")
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PRIVATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_CPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CPU_AT_LOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CPU_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_RUNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_AT_LOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PRIVATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_REPACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    n_ctx: int
    replicas: int
    weights_mapped_bytes: int
    weights_private_bytes: int
    weights_gpu_bytes: int
    kv_cache_cpu_bytes: int
    kv_cache_gpu_bytes: int
    compute_cpu_at_load_bytes: int
    compute_cpu_peak_bytes: int
    compute_gpu_bytes: int
    runtime_bytes: int
    gpu_runtime_bytes: int
    private_at_load_bytes: int
    private_peak_bytes: int
    gpu_bytes: int
    total_private_bytes: int
    total_gpu_bytes: int
    weights_repacked_bytes: int
    outputs_bytes: int
    parallel: int
    def __init__(self, n_ctx: _Optional[int] = ..., replicas: _Optional[int] = ..., weights_mapped_bytes: _Optional[int] = ..., weights_private_bytes: _Optional[int] = ..., weights_gpu_bytes: _Optional[int] = ..., kv_cache_cpu_bytes: _Optional[int] = ..., kv_cache_gpu_bytes: _Optional[int] = ..., compute_cpu_at_load_bytes: _Optional[int] = ..., compute_cpu_peak_bytes: _Optional[int] = ..., compute_gpu_bytes: _Optional[int] = ..., runtime_bytes: _Optional[int] = ..., gpu_runtime_bytes: _Optional[int] = ..., private_at_load_bytes: _Optional[int] = ..., private_peak_bytes: _Optional[int] = ..., gpu_bytes: _Optional[int] = ..., total_private_bytes: _Optional[int] = ..., total_gpu_bytes: _Optional[int] = ..., weights_repacked_bytes: _Optional[int] = ..., outputs_bytes: _Optional[int] = ..., parallel: _Optional[int] = ...) -> None: ...

class EstimateModelRequest(_message.Message):
    __slots__ = ("path", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    path: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, path: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EstimateModelResponse(_message.Message):
    __slots__ = ("path", "architecture", "file_size_bytes", "estimate")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    path: str
    architecture: str
    file_size_bytes: int
    estimate: MemoryEstimate
    def __init__(self, path: _Optional[str] = ..., architecture: _Optional[str] = ..., file_size_bytes: _Optional[int] = ..., estimate: _Optional[_Union[MemoryEstimate, _Mapping]] = ...) -> None: ...

class ScanCatalogRequest(_message.Message):
    __slots__ = ("find_stores", "paths")
    FIND_STORES_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    find_stores: bool
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, find_stores: _Optional[bool] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class OllamaStore(_message.Message):
    __slots__ = ("path", "found_by", "models", "size_bytes", "served", "problem")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    path: str
    found_by: str
    models: int
    size_bytes: int
    served: bool
    problem: str
    def __init__(self, path: _Optional[str] = ..., found_by: _Optional[str] = ..., models: _Optional[int] = ..., size_bytes: _Optional[int] = ..., served: _Optional[bool] = ..., problem: _Optional[str] = ...) -> None: ...

class ScanCatalogResponse(_message.Message):
    __slots__ = ("model_dirs", "available", "problems", "stores", "config_path")
    MODEL_DIRS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    model_dirs: _containers.RepeatedScalarFieldContainer[str]
    available: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    stores: _containers.RepeatedCompositeFieldContainer[OllamaStore]
    config_path: str
    def __init__(self, model_dirs: _Optional[_Iterable[str]] = ..., available: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., stores: _Optional[_Iterable[_Union[OllamaStore, _Mapping]]] = ..., config_path: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("model", "pid", "state", "private_memory_bytes", "file_rss_bytes", "requests_served", "uptime_s", "queue_depth", "restarts", "last_exit", "gpu_memory_bytes", "recycles", "last_recycle_reason", "unload_in_s", "cpu_percent", "gpu_temperature_c", "throttle_reason", "tokens_per_second", "memory_note", "replica", "memory_lines", "pool")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECYCLES_FIELD_NUMBER: _ClassVar[int]
    LAST_RECYCLE_REASON_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_IN_S_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    GPU_TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NOTE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LINES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    model: str
    pid: int
    state: str
    private_memory_bytes: int
    file_rss_bytes: int
    requests_served: int
    uptime_s: float
    queue_depth: int
    restarts: int
    last_exit: str
    gpu_memory_bytes: int
    recycles: int
    last_recycle_reason: str
    unload_in_s: float
    cpu_percent: float
    gpu_temperature_c: float
    throttle_reason: str
    tokens_per_second: float
    memory_note: str
    replica: int
    memory_lines: MemoryLines
    pool: PoolStatus
    def __init__(self, model: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., private_memory_bytes: _Optional[int] = ..., file_rss_bytes: _Optional[int] = ..., requests_served: _Optional[int] = ..., uptime_s: _Optional[float] = ..., queue_depth: _Optional[int] = ..., restarts: _Optional[int] = ..., last_exit: _Optional[str] = ..., gpu_memory_bytes: _Optional[int] = ..., recycles: _Optional[int] = ..., last_recycle_reason: _Optional[str] = ..., unload_in_s: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., gpu_temperature_c: _Optional[float] = ..., throttle_reason: _Optional[str] = ..., tokens_per_second: _Optional[float] = ..., memory_note: _Optional[str] = ..., replica: _Optional[int] = ..., memory_lines: _Optional[_Union[MemoryLines, _Mapping]] = ..., pool: _Optional[_Union[PoolStatus, _Mapping]] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("parallel", "sequences_active", "cells_used", "n_ctx", "sequences_cached", "preemptions")
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CELLS_USED_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    parallel: int
    sequences_active: int
    cells_used: int
    n_ctx: int
    sequences_cached: int
    preemptions: int
    def __init__(self, parallel: _Optional[int] = ..., sequences_active: _Optional[int] = ..., cells_used: _Optional[int] = ..., n_ctx: _Optional[int] = ..., sequences_cached: _Optional[int] = ..., preemptions: _Optional[int] = ...) -> None: ...

class MemoryLines(_message.Message):
    __slots__ = ("max_private_memory_bytes", "hard_private_memory_bytes", "rlimit_data_bytes", "leak_threshold_bytes", "max_gpu_memory_bytes", "source")
    class SourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MAX_PRIVATE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HARD_PRIVATE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RLIMIT_DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEAK_THRESHOLD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    max_private_memory_bytes: int
    hard_private_memory_bytes: int
    rlimit_data_bytes: int
    leak_threshold_bytes: int
    max_gpu_memory_bytes: int
    source: _containers.ScalarMap[str, str]
    def __init__(self, max_private_memory_bytes: _Optional[int] = ..., hard_private_memory_bytes: _Optional[int] = ..., rlimit_data_bytes: _Optional[int] = ..., leak_threshold_bytes: _Optional[int] = ..., max_gpu_memory_bytes: _Optional[int] = ..., source: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "temperature_c", "memory_used_bytes", "memory_total_bytes", "throttle_reasons")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    index: int
    temperature_c: float
    memory_used_bytes: int
    memory_total_bytes: int
    throttle_reasons: int
    def __init__(self, index: _Optional[int] = ..., temperature_c: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., throttle_reasons: _Optional[int] = ...) -> None: ...

class RecycleModelRequest(_message.Message):
    __slots__ = ("name", "hard")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    hard: bool
    def __init__(self, name: _Optional[str] = ..., hard: _Optional[bool] = ...) -> None: ...

class RecycleModelResponse(_message.Message):
    __slots__ = ("old_pid", "new_pid")
    OLD_PID_FIELD_NUMBER: _ClassVar[int]
    NEW_PID_FIELD_NUMBER: _ClassVar[int]
    old_pid: int
    new_pid: int
    def __init__(self, old_pid: _Optional[int] = ..., new_pid: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "workers", "standby_pids", "gpus", "cpu_temperature_c", "gpu_note")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_PIDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    GPU_NOTE_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    standby_pids: _containers.RepeatedScalarFieldContainer[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    cpu_temperature_c: float
    gpu_note: str
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., standby_pids: _Optional[_Iterable[int]] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ..., cpu_temperature_c: _Optional[float] = ..., gpu_note: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time_unix", "kind", "model", "worker_pid", "reason", "state", "figures")
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    time_unix: float
    kind: str
    model: str
    worker_pid: int
    reason: str
    state: str
    figures: _containers.ScalarMap[str, str]
    def __init__(self, time_unix: _Optional[float] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., worker_pid: _Optional[int] = ..., reason: _Optional[str] = ..., state: _Optional[str] = ..., figures: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class ModelChange(_message.Message):
    __slots__ = ("name", "action", "keys", "new_worker", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEW_WORKER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    action: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    new_worker: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., action: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., new_worker: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ReloadConfigResponse(_message.Message):
    __slots__ = ("config_path", "models", "live_settings", "restart_settings", "applied")
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RESTART_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    config_path: str
    models: _containers.RepeatedCompositeFieldContainer[ModelChange]
    live_settings: _containers.RepeatedScalarFieldContainer[str]
    restart_settings: _containers.RepeatedScalarFieldContainer[str]
    applied: bool
    def __init__(self, config_path: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelChange, _Mapping]]] = ..., live_settings: _Optional[_Iterable[str]] = ..., restart_settings: _Optional[_Iterable[str]] = ..., applied: _Optional[bool] = ...) -> None: ...

class StartModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StartModelResponse(_message.Message):
    __slots__ = ("pid", "already_running")
    PID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_RUNNING_FIELD_NUMBER: _ClassVar[int]
    pid: int
    already_running: bool
    def __init__(self, pid: _Optional[int] = ..., already_running: _Optional[bool] = ...) -> None: ...

class StopModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StopModelResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class TailModelRequest(_message.Message):
    __slots__ = ("name", "lines", "follow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    lines: int
    follow: bool
    def __init__(self, name: _Optional[str] = ..., lines: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time_unix", "worker_pid", "line")
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    time_unix: float
    worker_pid: int
    line: str
    def __init__(self, time_unix: _Optional[float] = ..., worker_pid: _Optional[int] = ..., line: _Optional[str] = ...) -> None: ...
