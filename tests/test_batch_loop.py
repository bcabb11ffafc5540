"""The batch loop over the real engine, in this process: what its bookkeeping says of the KV pool is what
llama.cpp holds, through cancels, preemptions and cached sequences."""

from __future__ import annotations

import json
import time

import llama_cpp
import pytest

from worker.batching.loop import DONE, BatchLoop, Request
from worker.engine import LlamaEngine
from worker.generation import Outcome, Sampling, TextStream
from worker.service import grammar_from
from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import wait_for


class Stepping(LlamaEngine):
    """Sleeps after each decode: a test can act between steps."""

    delay = 0.0

    def decode(self, chunks):
        super().decode(chunks)
        time.sleep(self.delay)


@pytest.fixture
def engine(model_dir, request):
    options = {"n_ctx": 256, "n_batch": 64, "parallel": 4, **getattr(request, "param", {})}
    engine = Stepping()
    info = engine.load(str(model_dir / "tiny.gguf"), options)
    loop = BatchLoop(engine, info)
    yield engine, loop
    loop.stop()
    engine.close()


def submit(engine, loop, prompt: str, **sampling) -> Request:
    s = Sampling(**{"temperature": 0.0, **sampling})
    tokens = engine.tokenize(prompt, True)
    request = Request(tokens, s, engine.sampler(s), TextStream(engine, len(tokens), s, loop.n_ctx, Outcome()))
    loop.submit(request)
    return request


def text_of(request: Request, timeout: float = 60) -> str:
    pieces = []
    deadline = time.monotonic() + timeout
    while True:
        item = request.out.get(timeout=max(deadline - time.monotonic(), 0.01))
        if item is DONE:
            return "".join(pieces)
        if isinstance(item, BaseException):
            raise item
        pieces.append(item.text)


def cells_in_llama(engine: LlamaEngine, seq: int) -> int:
    """The cells llama.cpp holds for a sequence: positions 0…pos_max, as our sequences never skip one."""
    return llama_cpp.llama_memory_seq_pos_max(engine._ctx.memory, seq) + 1


def assert_books_match_llama(engine, loop) -> None:
    """Compared on the loop's own thread, between two steps, while other requests may be running."""
    def compare():
        return [(slot.index, cells_in_llama(engine, slot.index),
                 slot.request.held if slot.request is not None else len(slot.cached)) for slot in loop.slots]

    for index, in_llama, in_books in loop.call(compare):
        assert in_llama == in_books, (index, in_llama, in_books)


PROMPTS = ["hello world", "the model is a worker", "one two three four", "memory leak cache context"]


def test_four_requests_in_a_pool_too_small_for_them_resume_exactly_and_the_books_match_llama(engine):
    engine, loop = engine
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    grammar = grammar_from(pb.SamplingOptions(json_schema=schema))
    alone = [text_of(submit(engine, loop, p, max_tokens=200)) for p in PROMPTS]
    constrained_alone = text_of(submit(engine, loop, "json", max_tokens=60, grammar=grammar))
    assert_books_match_llama(engine, loop)
    before = loop.preemptions
    requests = [submit(engine, loop, p, max_tokens=200) for p in PROMPTS]
    constrained = submit(engine, loop, "json", max_tokens=60, grammar=grammar)
    assert [text_of(r) for r in requests] == alone
    assert text_of(constrained) == constrained_alone and isinstance(json.loads(constrained_alone)["ok"], bool)
    assert loop.preemptions > before
    assert_books_match_llama(engine, loop)


@pytest.mark.parametrize("engine", [{"n_ctx": 2048, "n_batch": 16}], indirect=True)
def test_a_cancel_mid_prompt_frees_its_cells_in_llama_at_the_next_step(engine):
    engine, loop = engine
    engine.delay = 0.02  # 16 tokens a step: a ~900-token prompt takes ~60 steps, over a second
    other = submit(engine, loop, "hello", max_tokens=1000)
    long = submit(engine, loop, " ".join(["the model is a worker"] * 40), max_tokens=4)
    wait_for(lambda: long.held > 0, 10, interval=0.005, what="the long prompt to start")
    assert long.held < len(long.prompt)
    long.cancel.set()
    assert long.freed.wait(1)
    assert long.outcome.finish_reason == "CANCELLED" and long.outcome.completion_tokens == 0
    assert_books_match_llama(engine, loop)
    assert loop.stats.active == 1
    other.cancel.set()
    assert other.freed.wait(1)
    assert_books_match_llama(engine, loop)
    assert loop.stats.cells == 0  # a cancelled request leaves no cache behind


def test_a_request_submitted_to_a_stopping_loop_is_told_so(engine):
    engine, loop = engine
    loop.stop()
    request = submit(engine, loop, "hello", max_tokens=4)
    with pytest.raises(RuntimeError, match="stopping"):
        text_of(request)
    assert request.freed.is_set()


@pytest.mark.parametrize("engine", [{"n_ctx": 1024}], indirect=True)
def test_a_shared_system_prompt_is_shared_not_cut_out_of_another_conversations_cache(engine):
    engine, loop = engine
    system = " ".join(["the supervisor keeps the model worker alive"] * 6)
    first_turn = system + " hello world"
    text_of(submit(engine, loop, first_turn, max_tokens=20))
    other = submit(engine, loop, system + " one two three", max_tokens=20)
    text_of(other)
    shared = len(engine.tokenize(system, True)) - 1  # the last token may be merged with what follows
    assert other.outcome.cached_prompt_tokens >= shared
    assert_books_match_llama(engine, loop)
    # The first conversation's cache is whole: its next turn skips all of its first turn.
    again = submit(engine, loop, first_turn + " and then more", max_tokens=4)
    text_of(again)
    assert again.outcome.cached_prompt_tokens >= len(engine.tokenize(first_turn, True)) - 1
    assert_books_match_llama(engine, loop)


def drop_caches(loop) -> None:
    loop.call(lambda: [loop._evict(s) for s in loop.slots if s.request is None and s.cached])


@pytest.mark.parametrize("engine", [{"n_ctx": 512}], indirect=True)
def test_a_request_sharing_a_prefix_goes_on_exactly_when_its_source_is_evicted_under_it(engine):
    engine, loop = engine
    system = " ".join(["the supervisor keeps the model worker alive"] * 5)
    sharer_prompt = system + " one two three"
    alone = text_of(submit(engine, loop, sharer_prompt, max_tokens=100))
    drop_caches(loop)
    text_of(submit(engine, loop, system + " hello world", max_tokens=20))  # the cache to share from
    sharer = submit(engine, loop, sharer_prompt, max_tokens=100)
    # Two more requests need the cells: the source cache goes while the sharer decodes, then some preempting.
    others = [submit(engine, loop, p * 12, max_tokens=80) for p in ("memory leak cache context ", "yes no one two ")]
    assert text_of(sharer) == alone
    assert sharer.outcome.cached_prompt_tokens >= len(engine.tokenize(system, True)) - 1
    for other in others:
        text_of(other)
    assert_books_match_llama(engine, loop)
    assert loop.stats.cells <= loop.n_ctx


def test_stop_words_that_are_control_tokens_are_found_by_id(engine):
    llama, _ = engine
    # The generated vocabulary's <s> is a control token but not end-of-generation: a stop word only by id.
    assert llama.control_tokens(["<s>", "hello", "</s>", "<s>x"]) == {1, 2}
