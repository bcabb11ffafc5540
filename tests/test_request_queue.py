"""A replica's request queue: `parallel` places, first in first out, whatever the cancels."""

from __future__ import annotations

import asyncio

from supervisor.serving.queue import RequestQueue


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_parallel_requests_run_at_once_and_the_rest_wait_in_order():
    async def scenario():
        queue = RequestQueue(lambda: 2)
        order: list[int] = []

        async def request(i: int) -> None:
            await queue.enter()
            order.append(i)

        tasks = [asyncio.create_task(request(i)) for i in range(5)]
        await settle()
        assert order == [0, 1] and (queue.running, queue.waiting, queue.full) == (2, 3, True)
        queue.leave()
        await settle()
        assert order == [0, 1, 2]
        queue.leave()
        queue.leave()
        await settle()
        assert order == [0, 1, 2, 3, 4] and queue.load == 2
        await asyncio.gather(*tasks)

    run(scenario)


def test_a_waiter_cancelled_as_it_is_handed_a_place_passes_it_on():
    async def scenario():
        queue = RequestQueue(lambda: 1)
        await queue.enter()
        first = asyncio.create_task(queue.enter())
        second = asyncio.create_task(queue.enter())
        await settle()
        queue.leave()  # hands the place to `first`…
        first.cancel()  # …which is cancelled before it runs again
        await asyncio.gather(first, return_exceptions=True)
        await second  # the place went on to the next in line
        assert (queue.running, queue.waiting) == (1, 0)

    run(scenario)


def test_a_waiter_cancelled_after_its_place_was_dropped_raises_only_cancelled():
    async def scenario():
        queue = RequestQueue(lambda: 1)
        await queue.enter()
        waiter = asyncio.create_task(queue.enter())
        await settle()
        waiter.cancel()
        queue.leave()  # runs _hand_on before the cancelled waiter resumes: its future is dropped there
        results = await asyncio.gather(waiter, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert (queue.running, queue.waiting, queue.full) == (0, 0, False)

    run(scenario)


def test_drain_holds_every_place_until_reopen_and_gives_them_back_on_timeout():
    async def scenario():
        queue = RequestQueue(lambda: 3)
        await queue.enter()
        assert not await queue.drain(0.05)  # one request still runs
        assert queue.running == 1  # the places it took meanwhile are back
        queue.leave()
        assert await queue.drain(1)
        late = asyncio.create_task(queue.enter())
        await settle()
        assert not late.done()
        queue.reopen()
        await late
        assert queue.running == 1

    run(scenario)


def test_a_larger_capacity_lets_waiters_in_at_once():
    async def scenario():
        capacity = [1]
        queue = RequestQueue(lambda: capacity[0])
        await queue.enter()
        waiter = asyncio.create_task(queue.enter())
        await settle()
        assert not waiter.done()
        capacity[0] = 2
        queue.refresh()
        await waiter
        assert queue.running == 2

    run(scenario)
