"""The executor: one thread that owns the engine and runs one decode step at a time for every request
the worker holds — the thin half of STYLE.md's planner/executor split (the decisions are plan.py's).

Every llama.cpp computation runs on this one thread: libgomp keeps an OpenMP thread team per calling
thread, and a second team's spinning threads cost a quarter of tokens/s on 2 cores. gRPC threads only
hand requests in (`submit`) and read their pieces out; a request's cancel is seen at the next step, also
while its prompt is being evaluated, and its cells are freed then.
"""

from __future__ import annotations

import bisect
import itertools
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..engine import Chunk, Engine, EngineInfo, NoRoom, Sampler
from ..generation import CANCELLED, Outcome, Sampling, TextStream
from .plan import Cached, Running, SlotView, choose_slot, plan_step

DONE = object()  # the last item of a request's output queue, unless it is the exception that failed it


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    sampler: Sampler
    stream: TextStream
    cancel: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # prompt + what it generated: what its cells must hold
    slot: int | None = None
    held: int = 0          # cells its sequence holds (tokens[:held] are evaluated)
    shared: int = 0        # of those, the first `shared` are also a cache's (shared_from): counted there
    shared_from: int | None = None
    held_at_start: int = 0  # what it held when it got its slot: more means it has started
    admitted: bool = False  # it has held a slot once (its cached prefix is counted then)
    freed: threading.Event = field(default_factory=threading.Event)  # over: its sequence holds no cell

    @property
    def outcome(self) -> Outcome:
        return self.stream.outcome


@dataclass
class Slot:
    index: int
    request: Request | None = None
    cached: list[int] = field(default_factory=list)  # what a finished sequence's cells still hold
    cached_prompt: int = 0  # how much of that was its prompt
    last_used: int = 0


@dataclass(frozen=True)
class PoolStats:
    active: int       # sequences generating or evaluating their prompt
    cells: int        # KV cells in use, cached sequences' included
    cached: int       # finished sequences kept for a follow-up
    preemptions: int  # since the worker started
    cells_high: int = 0  # the most cells in use at once since the worker started


class BatchLoop:
    def __init__(self, engine: Engine, info: EngineInfo, beat: Callable[[PoolStats], None] = lambda stats: None) -> None:
        self.engine = engine
        self.n_ctx = info.n_ctx
        self.n_batch = info.n_batch
        self.slots = [Slot(i) for i in range(max(1, info.parallel))]
        self.beat = beat
        self.requests_served = 0
        self.preemptions = 0
        self.cells_high = 0
        self.working = False  # a step is under way or due: the loop's own beats prove progress then
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: list[Request] = []  # by id: a preempted request goes back before later ones
        self._ids = itertools.count(1)
        self._steps = itertools.count(1)
        self._stopping = False
        self._stopping_lock = threading.Lock()  # nothing enters the inbox once the loop is stopping
        self._thread = threading.Thread(target=self._run, name="batch", daemon=True)
        self._thread.start()

    # -- from other threads ----------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._stopping_lock:
            if not self._stopping:
                self._inbox.put(request)
                return
        request.sampler.close()
        request.freed.set()
        request.out.put(RuntimeError("the worker is stopping"))

    def call(self, function: Callable[[], object]) -> object:
        """Run `function` on the loop's thread between steps (the warm-up), and return its result."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        with self._stopping_lock:
            if self._stopping:
                raise RuntimeError("the worker is stopping")
            self._inbox.put((function, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        with self._stopping_lock:
            self._stopping = True
            self._inbox.put(None)
        self._thread.join()

    @property
    def stats(self) -> PoolStats:
        """Read from any thread: each slot's request is read once, as the loop may end it meanwhile."""
        active = cells = cached = 0
        for slot in self.slots:
            request, kept = slot.request, slot.cached
            if request is not None:
                active += 1
                cells += request.held - request.shared
            elif kept:
                cached += 1
                cells += len(kept)
        cells = min(cells, self.n_ctx)  # a prefix shared from a cache that changed since counts twice: never more
        return PoolStats(active, cells, cached, self.preemptions, max(self.cells_high, cells))

    # -- the loop ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception as e:  # a defect of ours: fail what is in flight, never strand a stream
                traceback.print_exc()
                self._fail_all(e)
                self._publish()
        self._take_inbox(block=False)  # what came in before the stop: nothing comes after it
        self._fail_all(RuntimeError("the worker is stopping"))
        self._publish()

    def _publish(self) -> None:
        """The pool's figures to the heartbeat; only this thread moves the high-water mark."""
        stats = self.stats
        self.cells_high = stats.cells_high
        self.working = bool(self._waiting) or stats.active > 0
        self.beat(stats)

    def _fail_all(self, error: BaseException) -> None:
        requests, self._waiting = self._waiting + [s.request for s in self.slots if s.request is not None], []
        for request in requests:
            self._finish(request, error=error)

    def _turn(self) -> None:
        busy = self._waiting or any(s.request for s in self.slots)
        self._take_inbox(block=not busy)
        if self._waiting:
            self.working = True  # before the first step, which may be the one that hangs
        try:
            self._drop_cancelled()
            self._admit()
            if any(s.request for s in self.slots):
                self._step()
        finally:
            self._publish()  # also after a cancel with no step to follow: status must not go stale
        if busy and not (self._waiting or any(s.request for s in self.slots)):
            self.engine.idle()  # the heap back to the OS once nothing runs

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                continue
            if isinstance(item, tuple):  # a call to run here
                function, done = item
                try:
                    done.put((True, function()))
                except BaseException as e:
                    done.put((False, e))
                continue
            item.id = next(self._ids)
            item.tokens = list(item.prompt)
            self._waiting.append(item)  # a cancel that came first drops it before it is admitted

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancel.is_set()]:
            self._waiting.remove(request)
            self._finish(request, CANCELLED)
        for slot in self.slots:
            if slot.request is not None and slot.request.cancel.is_set():
                self._finish(slot.request, CANCELLED)

    def _admit(self) -> None:
        while self._waiting:
            request = self._waiting[0]
            views = [SlotView(s.index, s.request is not None, s.cached, s.last_used, s.cached_prompt) for s in self.slots]
            choice = choose_slot(request.tokens, views)
            if choice is None:
                return
            self._waiting.pop(0)
            slot = self.slots[choice.slot]
            try:
                held = 0
                if slot.cached:  # its own cache cut to the shared prefix, or all of it gone for another's
                    self._cache_changes(slot)
                    held = self.engine.forget(slot.index, choice.keep if choice.source is None else 0)
                    slot.cached = []
                if choice.source is not None:
                    held = self.engine.share(choice.source, slot.index, choice.keep)
                    if held:
                        request.shared, request.shared_from = held, choice.source
                        self.slots[choice.source].last_used = next(self._steps)  # useful: keep it longest
            except Exception as e:
                traceback.print_exc()
                self._finish(request, error=e)
                continue
            request.held = request.held_at_start = held
            if not request.admitted:
                request.admitted = True
                request.outcome.cached_prompt_tokens = held
            slot.request, request.slot = request, slot.index

    def _step(self) -> None:
        by_id = {s.request.id: s.request for s in self.slots if s.request is not None}
        running = [Running(r.id, r.held - r.shared, len(r.tokens) - r.held, r.id, r.held > r.held_at_start)
                   for r in by_id.values()]
        shared: dict[int, int] = {}  # cache slot → the longest prefix running requests share from it
        for r in by_id.values():
            if r.shared_from is not None:
                shared[r.shared_from] = max(shared.get(r.shared_from, 0), r.shared)
        # Evicting a cache frees only what no running request shares.
        cached = [Cached(s.index, len(s.cached), s.last_used, len(s.cached) - shared.get(s.index, 0))
                  for s in self.slots if s.request is None and s.cached]
        step = plan_step(running, cached, self.n_ctx, self.n_batch)
        for index in step.evict:
            self._evict(self.slots[index])
        for id_ in step.preempt:
            self._preempt(by_id[id_])
        if not step.chunks:
            return
        chunks = []
        sampling = []  # (request, the batch index of the token whose logits it samples from)
        position = 0
        for id_, n in step.chunks:
            request = by_id[id_]
            last = request.held + n == len(request.tokens)
            chunks.append(Chunk(request.slot, request.tokens[request.held:request.held + n], request.held, last))
            position += n
            if last:
                sampling.append((request, position - 1))
        try:
            self.engine.decode(chunks)
        except NoRoom:
            # The cache could not place the batch although the plan counted room (cells fragmented):
            # free the cached sequences, else the newest running request, and go again next step.
            cached = [s for s in self.slots if s.request is None and s.cached]
            for slot in cached:
                self._evict(slot)
            running = [s.request for s in self.slots if s.request is not None]  # after the plan's preemptions
            if not cached and running:
                newest = max(running, key=lambda r: r.id)
                if len(running) > 1:
                    self._preempt(newest)
                else:
                    self._finish(newest, error=RuntimeError("llama_decode found no room in the KV cache"))
            return
        except Exception as e:
            traceback.print_exc()
            for id_, _ in step.chunks:
                self._finish(by_id[id_], error=e)
            return
        for (id_, n) in step.chunks:
            by_id[id_].held += n
        for request, index in sampling:
            self._sample(request, index)

    def _sample(self, request: Request, index: int) -> None:
        try:
            token = request.sampler.sample(index)
            request.tokens.append(token)
            piece = request.stream.feed(token)
        except Exception as e:  # this request's trouble: the others go on
            traceback.print_exc()
            self._finish(request, error=e)
            return
        if piece is not None:
            request.out.put(piece)
        if request.stream.finished:
            self._finish(request)

    def _cache_changes(self, slot: Slot) -> None:
        """A cache is about to be evicted or cut: the prefixes shared from it are its sharers' own now."""
        for other in self.slots:
            if other.request is not None and other.request.shared_from == slot.index:
                other.request.shared, other.request.shared_from = 0, None

    def _evict(self, slot: Slot) -> None:
        self._cache_changes(slot)
        self.engine.forget(slot.index, 0)
        slot.cached = []

    def _preempt(self, request: Request) -> None:
        """Free its cells and put it back in line; it resumes by evaluating what it had again."""
        self.engine.forget(request.slot, 0)
        self.slots[request.slot].request = None
        request.slot, request.held = None, 0
        request.shared, request.shared_from = 0, None
        bisect.insort(self._waiting, request, key=lambda r: r.id)
        self.preemptions += 1

    def _finish(self, request: Request, reason: str | None = None, error: BaseException | None = None) -> None:
        """The request is over: its slot is freed (its cells kept as a cache when it completed), its
        sampler closed, and its stream told — whatever freeing the cells raises."""
        try:
            completed = reason is None and error is None
            request.shared, request.shared_from = 0, None
            if request.slot is not None:
                slot, request.slot = self.slots[request.slot], None
                slot.request = None
                if completed and request.held:
                    slot.cached, slot.last_used = request.tokens[:request.held], next(self._steps)
                    slot.cached_prompt = len(request.prompt)
                else:
                    self.engine.forget(slot.index, 0)
            request.sampler.close()
        except Exception as e:
            traceback.print_exc()
            error = error or e
        finally:
            request.freed.set()
            if error is not None:
                request.out.put(error)
            else:
                if reason is not None:
                    tail = request.stream.end(reason)
                    if tail is not None:
                        request.out.put(tail)
                self.requests_served += 1
                request.out.put(DONE)
        try:
            self.engine.after_request()
        except Exception:
            traceback.print_exc()
