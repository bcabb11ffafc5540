"""Checks on what a client sends, before anything reaches a worker. Pure: request + model config in,
a cleaned request or an INVALID_ARGUMENT with a message that says what is allowed."""

from __future__ import annotations

import json
import math

from llm_supervisor.v1 import supervisor_pb2 as pb

from supervisor.settings.config import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, ModelConfig
from supervisor.errors import invalid
from supervisor.settings.units import parse_duration

CHAT_ROLES = ("system", "user", "assistant", "tool")


MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def check_options(options: pb.SamplingOptions, model: ModelConfig) -> pb.SamplingOptions:
    """The request's options, checked, with the model's defaults where the request left one unset."""
    out = pb.SamplingOptions()
    out.CopyFrom(options)
    for field in MODEL_DEFAULTS:
        if not options.HasField(field) and getattr(model, field) is not None:
            setattr(out, field, getattr(model, field))
    if not options.stop:
        out.stop.extend(model.stop)

    def in_range(field: str, low: float, high: float) -> None:
        if options.HasField(field):
            value = getattr(options, field)
            if not math.isfinite(value) or not low <= value <= high:
                raise invalid(f"{field} must be between {low:g} and {high:g}, got {value}")

    in_range("temperature", 0.0, 100.0)
    in_range("top_p", 0.0, 1.0)
    in_range("min_p", 0.0, 1.0)
    in_range("repeat_penalty", 0.0, 100.0)
    if options.HasField("repeat_penalty") and options.repeat_penalty == 0.0:
        raise invalid("repeat_penalty must be more than 0 (1.0 turns it off)")
    in_range("frequency_penalty", -2.0, 2.0)  # OpenAI's range
    in_range("presence_penalty", -2.0, 2.0)
    check_constraint(options)
    if options.HasField("top_k") and options.top_k > 1_000_000:
        raise invalid(f"top_k must be at most 1000000 (0 turns it off), got {options.top_k}")
    if len(options.stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(options.stop)}")
    for stop in options.stop:
        if not stop:
            raise invalid("a stop sequence cannot be empty")
        if len(stop) > MAX_STOP_LENGTH:
            raise invalid(f"a stop sequence is at most {MAX_STOP_LENGTH} characters, got {len(stop)}")
    if model.max_tokens:
        if options.max_tokens > model.max_tokens:
            raise invalid(f"max_tokens {options.max_tokens} is above model {model.name!r}'s cap of "
                          f"{model.max_tokens} (max_tokens in its config)")
        if options.max_tokens == 0:
            out.max_tokens = model.max_tokens
    return out


MAX_GRAMMAR_LENGTH = 256 * 1024


def check_constraint(options: pb.SamplingOptions) -> None:
    """grammar or json_schema, not both; a schema must be JSON. Whether a grammar parses, and whether a
    schema converts, the worker says (llama.cpp's parser and llama-cpp-python's converter decide)."""
    if options.grammar and options.json_schema:
        raise invalid("give grammar or json_schema, not both")
    for field in ("grammar", "json_schema"):
        if len(getattr(options, field)) > MAX_GRAMMAR_LENGTH:
            raise invalid(f"{field} is at most {MAX_GRAMMAR_LENGTH} characters, got {len(getattr(options, field))}")
    if options.json_schema:
        try:
            schema = json.loads(options.json_schema)
        except ValueError as e:
            raise invalid(f"json_schema is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise invalid(f"json_schema must be a JSON object, got {type(schema).__name__}")


def check_model_name(name: str) -> None:
    if not name:
        raise invalid("model is empty: name a loaded model (llmctl models lists them)")


def check_prompt(prompt: str) -> None:
    if not prompt:
        raise invalid("prompt is empty")


MAX_EMBED_INPUTS = 2048  # OpenAI's own limit on one embeddings request


def check_inputs(inputs) -> None:
    """Embed's texts: at least one, none empty. Whether each fits the context, the worker says (it tokenizes)."""
    if not inputs:
        raise invalid("input is empty: give at least one text to embed")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise invalid(f"at most {MAX_EMBED_INPUTS} inputs a request, got {len(inputs)}")
    for i, text in enumerate(inputs):
        if not text:
            raise invalid(f"input[{i}] is empty")


def check_messages(messages) -> None:
    if not messages:
        raise invalid("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}")
    if all(not m.content for m in messages):
        raise invalid("every message is empty: a chat needs some content")


def check_keep_alive(text: str) -> float:
    try:
        return parse_duration(text, allow_forever=True)
    except ValueError as e:
        raise invalid(f"keep_alive: {e}") from None
