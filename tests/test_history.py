"""Long chats: the oldest turns go to fit the context or max_history_messages; the system prompt stays."""

from __future__ import annotations

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import model_table
from worker.history import drop_oldest, strip_thinking


def chat(*roles_contents: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in roles_contents]


def size(messages) -> int:
    return sum(len(m["content"]) for m in messages)


def test_drops_the_oldest_whole_turns_and_keeps_system_and_the_newest():
    history = chat(("system", "S" * 10), ("user", "u1" * 10), ("assistant", "a1" * 10), ("user", "u2" * 10),
                   ("assistant", "a2" * 10), ("user", "now"))
    kept, dropped = drop_oldest(history, lambda ms: size(ms) <= 60)
    assert kept == [history[0], history[3], history[4], history[5]] and dropped == 2
    # An assistant reply whose question went goes with it: the kept history starts with a user turn.
    kept, dropped = drop_oldest(history, lambda ms: size(ms) <= 40)
    assert kept == [history[0], history[5]] and dropped == 4
    # Nothing fits: the system prompt and the newest message are still kept (the worker then refuses).
    kept, dropped = drop_oldest(history, lambda ms: False)
    assert kept == [history[0], history[5]] and dropped == 4
    assert drop_oldest(history, lambda ms: True) == (history, 0)


def test_system_messages_are_kept_wherever_they_are():
    history = chat(("user", "old"), ("system", "rules"), ("assistant", "reply"), ("user", "now"))
    kept, _ = drop_oldest(history, lambda ms: len(ms) <= 2)
    assert kept == chat(("system", "rules"), ("user", "now"))


def test_reasoning_is_stripped_from_assistant_turns_only():
    history = chat(("user", "why <think>keep</think>"), ("assistant", "<think>long\nreasoning</think>\nAnswer."))
    assert strip_thinking(history) == chat(("user", "why <think>keep</think>"), ("assistant", "Answer."))


def long_history(turns: int) -> list[pb.ChatMessage]:
    messages = [pb.ChatMessage(role="system", content="be terse")]
    for i in range(turns):
        messages.append(pb.ChatMessage(role="user", content=f"question {i} about the model memory and the worker"))
        messages.append(pb.ChatMessage(role="assistant", content=f"answer {i}: the cache holds the context tokens"))
    messages.append(pb.ChatMessage(role="user", content="and now?"))
    return messages


def final(daemon, model: str, messages, max_tokens: int = 8) -> pb.GenerateChunk:
    return list(daemon.stub.Chat(pb.ChatRequest(model=model, messages=messages,
                                                options=pb.SamplingOptions(max_tokens=max_tokens, temperature=0))))[-1]


def test_chat_fits_a_long_history_into_the_context_and_says_how_much_it_left_out(start_daemon):
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256) + "\n"
                          + model_table("short", "tiny.gguf", n_ctx=256, max_history_messages=3) + "\n"
                          + model_table("thinking", "tiny.gguf", n_ctx=256, strip_thinking=False))
    messages = long_history(20)  # ~40 messages: far more than 256 tokens
    last = final(daemon, "tiny", messages)
    assert last.usage.completion_tokens == 8
    assert 0 < last.usage.messages_dropped < 40 and last.usage.messages_dropped % 2 == 0  # whole turns
    assert 256 - 8 - 100 < last.usage.prompt_tokens <= 256 - 8  # as much history as fits (a turn is ~80 tokens)

    short = final(daemon, "short", long_history(3))
    assert short.usage.messages_dropped == 4  # of 7 messages after the system prompt, the newest 3 are kept

    thought = [pb.ChatMessage(role="user", content="hi"),
               pb.ChatMessage(role="assistant", content="<think>" + "the model thinks " * 8 + "</think>hello"),
               pb.ChatMessage(role="user", content="again")]
    stripped, kept = final(daemon, "tiny", thought), final(daemon, "thinking", thought)
    assert stripped.usage.messages_dropped == kept.usage.messages_dropped == 0
    assert kept.usage.prompt_tokens - stripped.usage.prompt_tokens > 30  # the reasoning's tokens
