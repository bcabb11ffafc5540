"""Long chats: the oldest turns go to fit the context or max_history_messages; the system prompt stays."""

from __future__ import annotations

import math

import grpc
import grpc_testing
from hypothesis import given
from hypothesis import strategies as st

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import worker_pb2
from tests.conftest import model_table
from tests.test_worker_service import SERVICE, generate
from worker.engine import LlamaEngine
from worker.history import drop_oldest, strip_thinking
from worker.service import WorkerService


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


def one_turn_at_a_time(messages, fits):
    """The search drop_oldest must agree with: a render per dropped turn (quadratic, the old way)."""
    kept, dropped = list(messages), 0

    def first_turn():
        return next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)

    while not fits(kept) and (i := first_turn()) is not None:
        del kept[i]
        dropped += 1
        while (i := first_turn()) is not None and kept[i]["role"] == "assistant":
            del kept[i]
            dropped += 1
    return kept, dropped


class Refused(Exception):
    pass


histories = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.integers(0, 12)),
                     max_size=30).map(lambda turns: [{"role": r, "content": f"{i}:" + "x" * n}
                                                     for i, (r, n) in enumerate(turns)])


@given(histories, st.integers(0, 200), st.booleans())
def test_the_search_drops_exactly_what_dropping_turn_by_turn_would(history, limit, refuse_tools):
    calls = []

    def fits(kept):
        calls.append(kept)
        if refuse_tools and any(m["role"] == "tool" for m in kept):  # like a template without tool support
            raise Refused
        return size(kept) <= limit

    try:
        expected = one_turn_at_a_time(history, fits)
    except Refused:
        expected = None
    calls.clear()
    try:
        kept, dropped = drop_oldest(history, fits)
    except Refused:
        assert expected is None  # refused only where dropping turn by turn is refused too
        return
    assert calls[-1] == kept  # the caller keeps what its last call computed: that must be the answer
    assert len(calls) <= 2 * math.log2(len(history) + 1) + 4
    if expected is not None:
        assert (kept, dropped) == expected
    else:  # turn by turn stopped at a refused history; the search went on to one it could judge
        everything = sum(m["role"] != "system" for m in history[:-1])
        assert (size(kept) <= limit or dropped == everything) and dropped == len(history) - len(kept)


def test_fitting_5000_messages_takes_a_few_small_renders_not_one_per_turn():
    history = [{"role": "system", "content": "be terse"}]
    for i in range(2499):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": "now?"})
    rendered = []

    def fits(kept):  # room for the system prompt and the newest 10 messages
        rendered.append(len(kept))
        return len(kept) <= 11

    kept, dropped = drop_oldest(history, fits)
    assert kept == history[:1] + history[-9:] and dropped == 4990
    # One render per dropped turn was 2,496 renders of 2.5 M messages in all; each render tried now
    # holds at most about twice what fits, so the cost follows the context and not the chat's length.
    assert len(rendered) <= 2 * math.log2(len(history)) + 4
    assert max(rendered) <= 2 * 11 + 2 and sum(rendered) < 250
    rendered.clear()
    assert drop_oldest(history, lambda kept: rendered.append(len(kept)) or True) == (history, 0)
    assert len(rendered) <= math.log2(len(history)) + 3


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


def test_a_5000_message_chat_is_cut_to_fit_without_the_worker_looking_hung(start_daemon):
    # Fitting must cost O(log n) renders, and beat the heartbeat between them: with a render per
    # dropped turn (quadratic) a 5,000-message chat kept the worker silent past heartbeat_timeout.
    daemon = start_daemon(model_table("tiny", "tiny.gguf", n_ctx=256, heartbeat_timeout="1s"),
                          extra='poll_interval = "100ms"')
    pid = daemon.worker("tiny").pid
    messages = long_history(2499)  # 5,000 messages with the system prompt and the newest question
    assert len(messages) == 5000
    last = list(daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages,
                                                options=pb.SamplingOptions(max_tokens=8, temperature=0)),
                                 timeout=60))[-1]
    assert last.usage.completion_tokens == 8 and last.worker_pid == pid
    # Whole turns go, the newest stay: a turn is ~80 tokens, so all but a few of 2,499 turns went.
    assert 2 * 2499 - 6 <= last.usage.messages_dropped < 2 * 2499 and last.usage.messages_dropped % 2 == 0
    assert daemon.worker("tiny").recycles == 0


def test_the_worker_beats_its_heartbeat_before_each_render_of_a_long_fit(model_dir):
    events: list[str] = []

    class Recording(LlamaEngine):
        def chat_prompt(self, messages):
            events.append("render")
            return super().chat_prompt(messages)

    engine = Recording()
    info = engine.load(str(model_dir / "tiny.gguf"), {"n_ctx": 256, "n_batch": 64})
    try:
        service = WorkerService("tiny", engine, info, beat=lambda pool=None: events.append("beat"))
        server = grpc_testing.server_from_dictionary({SERVICE: service}, grpc_testing.strict_real_time())
        request = worker_pb2.WorkerGenerateRequest(chat=pb.ChatRequest(messages=long_history(2499)),
                                                   options=pb.SamplingOptions(max_tokens=8, temperature=0))
        chunks, code, details = generate(server, request)
        assert code == grpc.StatusCode.OK, details
        assert chunks[-1].usage.messages_dropped >= 2 * 2499 - 6
        renders = [i for i, event in enumerate(events) if event == "render"]
        assert 1 < len(renders) <= 2 * math.log2(5000) + 4
        assert all(events[i - 1] == "beat" for i in renders)  # the supervisor sees progress between renders
    finally:
        service.close()
        engine.close()
