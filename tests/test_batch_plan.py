"""The step planner's rules, one table row each (worker/batching/plan.py): pure, no model."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from worker.batching.plan import Cached, Choice, Running, SlotView, Step, choose_slot, plan_step


def gen(id_: int, held: int) -> Running:
    """A request generating: its last sampled token is the one left to evaluate."""
    return Running(id_, held, 1, id_)


def prompt(id_: int, pending: int, held: int = 0) -> Running:
    return Running(id_, held, pending, id_)


@pytest.mark.parametrize("running, cached, n_ctx, n_batch, expected", [
    # Every decoding sequence gets its token, oldest first.
    ([gen(1, 10), gen(2, 10)], [], 100, 8, Step(chunks=((1, 1), (2, 1)))),
    # A long prompt is cut to what is left of n_batch once the decoding sequences are in.
    ([gen(1, 10), gen(2, 10), prompt(3, 2000)], [], 4096, 512, Step(chunks=((1, 1), (2, 1), (3, 510)))),
    # Two prompts: the oldest first, the next one gets the rest of the batch.
    ([prompt(1, 300), prompt(2, 300)], [], 4096, 512, Step(chunks=((1, 300), (2, 212)))),
    # A prompt takes only free cells; the next one gets nothing while the older one is short.
    ([prompt(1, 300, held=50), prompt(2, 300)], [], 100, 512, Step(chunks=((1, 50),))),
    # Short of cells: cached sequences go first, least recently used first.
    ([gen(1, 50)], [Cached(5, 30, last_used=2), Cached(6, 20, last_used=1)], 100, 8, Step(evict=(6,), chunks=((1, 1),))),
    # Still short: the newest running request is preempted, never the oldest.
    ([gen(1, 60), gen(2, 40)], [], 100, 8, Step(preempt=(2,), chunks=((1, 1),))),
    ([gen(1, 40), gen(2, 30), gen(3, 30)], [], 100, 8, Step(preempt=(3,), chunks=((1, 1), (2, 1)))),
    # Cached cells go before anyone is preempted.
    ([gen(1, 40), gen(2, 40)], [Cached(3, 20, 1)], 100, 8, Step(evict=(3,), chunks=((1, 1), (2, 1)))),
    # A prompt never preempts: it waits for cells.
    ([gen(1, 99), prompt(2, 50)], [], 100, 8, Step(chunks=((1, 1),))),
    # Everyone mid-prompt and the pool full: the newest holder makes way for the oldest.
    ([prompt(1, 50, held=50), prompt(2, 50, held=50)], [], 100, 512, Step(preempt=(2,), chunks=((1, 50),))),
    # A newest request holding nothing frees nothing: the one before it goes (and 3 does not start on
    # the cells 2 gave up).
    ([gen(1, 50), gen(2, 50), prompt(3, 10)], [], 100, 8, Step(preempt=(2,), chunks=((1, 1),))),
    # Nothing running, nothing to do.
    ([], [Cached(0, 10, 1)], 100, 8, Step()),
    # A preemption this step starts nothing newer on the cells it freed.
    ([gen(1, 60), gen(2, 39), prompt(3, 5)], [], 100, 64, Step(preempt=(2,), chunks=((1, 1),))),
    # A new request with a one-token prompt starts as prompts do: not on a preempted request's cells.
    ([gen(1, 60), gen(2, 40), prompt(3, 1)], [], 101, 64, Step(preempt=(2,), chunks=((1, 1),))),
    ([gen(1, 60), prompt(3, 1)], [], 101, 64, Step(chunks=((1, 1), (3, 1)))),
    # Three requests sharing a 1,500-cell prefix from a cache count it once: no one is preempted.
    ([gen(1, 50), gen(2, 50), gen(3, 50)], [Cached(0, 1600, 1, frees=100)], 4096, 512,
     Step(chunks=((1, 1), (2, 1), (3, 1)))),
    # Evicting a cache whose prefix is shared frees only what is its alone.
    ([gen(1, 60), gen(2, 5)], [Cached(0, 35, 1, frees=1)], 100, 8, Step(evict=(0,), preempt=(2,), chunks=((1, 1),))),
    # A request that starts with a shared prefix has not started: it waits until all of its prompt fits.
    ([gen(1, 600), gen(2, 300), Running(3, 20, 380, 3, started=False)], [Cached(0, 50, 1)], 1024, 512,
     Step(chunks=((1, 1), (2, 1)))),
])
def test_plan(running, cached, n_ctx, n_batch, expected):
    assert plan_step(running, cached, n_ctx, n_batch) == expected


requests = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 80)), min_size=1, max_size=6)
caches = st.lists(st.integers(0, 40), max_size=4)


@given(requests, caches, st.integers(60, 300), st.integers(1, 64))
def test_a_plan_never_overfills_the_pool_or_the_batch_and_the_oldest_always_runs(reqs, cache, n_ctx, n_batch):
    running = [Running(i, held, pending, i) for i, (held, pending) in enumerate(reqs)]
    cached = [Cached(10 + i, held, i) for i, held in enumerate(cache)]
    if sum(r.held for r in running) + sum(c.held for c in cached) > n_ctx or running[0].held + running[0].pending > n_ctx:
        return  # not a state the loop can be in: the pool holds what it holds, a request fits alone
    step = plan_step(running, cached, n_ctx, n_batch)
    held = {r.id: r.held for r in running}
    used = sum(h for i, h in held.items() if i not in step.preempt) + step.tokens
    used += sum(c.held for c in cached if c.slot not in step.evict)
    assert used <= n_ctx
    assert step.tokens <= n_batch
    assert 0 not in step.preempt
    assert any(i == 0 for i, _ in step.chunks)  # the oldest makes progress every step: no livelock
    assert all(0 < n <= next(r.pending for r in running if r.id == i) for i, n in step.chunks)


def test_a_next_turn_takes_over_the_cache_it_continues_keeping_all_but_the_last_prompt_token():
    slots = [SlotView(0, False, (1, 2, 9), 5), SlotView(1, False, (1, 2, 3, 4, 5), 1), SlotView(2, True)]
    assert choose_slot([1, 2, 3, 4, 5], slots) == Choice(1, 4)
    assert choose_slot([1, 2, 9, 9], slots) == Choice(0, 3)


def test_without_a_shared_prefix_an_empty_slot_before_a_cached_one_then_the_least_recent():
    assert choose_slot([7], [SlotView(0, False, (1,), 1), SlotView(1, False)]) == Choice(1, 0)
    assert choose_slot([7], [SlotView(0, False, (1,), 5), SlotView(1, False, (2,), 3)]) == Choice(1, 0)
    assert choose_slot([7], [SlotView(0, True), SlotView(1, True)]) is None


def test_a_few_shared_tokens_are_shared_into_another_slot_not_cut_out_of_their_cache():
    # Slot 0 holds a conversation; the new prompt shares its BOS and template header (or a system prompt).
    other = SlotView(0, False, (1, 2, 3, 10, 11, 12, 13, 14, 15, 16), 9)
    prompt = [1, 2, 3, 40, 41]
    assert choose_slot(prompt, [other, SlotView(1, False)]) == Choice(1, 3, source=0)
    # With no empty slot, the least recently used cache goes; the prefix is shared from the best match.
    assert choose_slot(prompt, [other, SlotView(1, False, (5, 6), 2)]) == Choice(1, 3, source=0)
    # The best match is itself the least recently used: it is cut down to the shared prefix in place.
    assert choose_slot(prompt, [other, SlotView(1, False, (5, 6), 12)]) == Choice(0, 3)
    # A long shared system prompt is no continuation either: the other conversation's prompt went on.
    conversation = SlotView(0, False, (1, 2, 3, 4, 5, 6, 10, 11, 20, 21), 9, prompt_len=8)
    assert choose_slot([1, 2, 3, 4, 5, 6, 30, 31], [conversation, SlotView(1, False)]) == Choice(1, 6, source=0)
    # Its next turn holds all of its prompt: it takes its cache over; so does the same prompt again.
    assert choose_slot([1, 2, 3, 4, 5, 6, 10, 11, 20, 40], [conversation, SlotView(1, False)]) == Choice(0, 9)
    assert choose_slot([1, 2, 3, 4, 5, 6, 10, 11], [conversation, SlotView(1, False)]) == Choice(0, 7)
