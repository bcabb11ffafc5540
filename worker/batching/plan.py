"""What one decode step does: pure decisions over a snapshot of the worker's sequences.

The split vLLM's scheduler makes and STYLE.md asks for: this module decides (which cached sequences lose
their cells, which request is preempted, which tokens go into the batch), `loop.py` executes. Nothing
here reads a clock, touches llama.cpp or mutates its inputs, so every rule has a table test.

The pool is llama.cpp's unified KV cache: `n_ctx` cells shared by every sequence. A sequence holds one
cell per token it has evaluated. Rules, in order:
1. Every decoding sequence (one token left to evaluate) gets its token into the batch: a stream never
   waits on another's prompt for more than one step.
2. Cells for them come from free cells, then from cached (finished) sequences, least recently used
   first, then by preempting the newest running request: its cells are freed and it goes back to the
   head of the queue, to be resumed by re-evaluating what it had. The oldest request is never preempted
   for a newer one, so it always finishes: no livelock.
3. What is left of `n_batch` goes to prompts, oldest request first, in chunks: a 2,000-token prompt
   costs the running streams at most one chunk per step. Prompts take free and cached cells, never a
   running request's, and a newer one leaves a cell free for every decoder's next token; one that has
   not started yet (new, or resumed) waits until all of it fits, so a resumed request is not preempted
   again at once (no thrash).
4. Whenever the oldest request would get nothing (the pool is full of newer requests' cells), the newest
   that holds cells is preempted, until it can: the oldest runs every step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Running:
    """A request that holds a slot (a sequence id)."""

    id: int
    held: int      # KV cells only its sequence holds (evaluated; a prefix shared from a cache is the cache's)
    pending: int   # tokens to evaluate before it can sample its next one (≥ 1)
    arrived: int   # its place in line (smaller = older); the newest is preempted first
    started: bool | None = None  # it has evaluated something since it got its slot (None: held > 0)

    @property
    def has_started(self) -> bool:
        return self.held > 0 if self.started is None else self.started

    @property
    def decoding(self) -> bool:
        """Generating: one sampled token to evaluate. A new request whose prompt is one token is not: it
        starts as prompts do."""
        return self.pending == 1 and self.held > 0


@dataclass(frozen=True)
class Cached:
    """A finished sequence whose cells are kept for a follow-up that shares its prefix."""

    slot: int
    held: int
    last_used: int  # larger = more recent; the least recent goes first
    frees: int | None = None  # cells its eviction frees: fewer than held when running requests share a prefix

    @property
    def freed_by_eviction(self) -> int:
        return self.held if self.frees is None else self.frees


@dataclass(frozen=True)
class Step:
    evict: tuple[int, ...] = ()                # cached slots whose cells are freed
    preempt: tuple[int, ...] = ()              # requests whose cells are freed; back to the queue's head
    chunks: tuple[tuple[int, int], ...] = ()   # (request id, tokens to evaluate), in batch order

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def plan_step(running: list[Running], cached: list[Cached], n_ctx: int, n_batch: int, may_start: bool = True) -> Step:
    """`may_start`: whether a request that holds no cell may start this step (not once one was preempted:
    a newer request must never take the cells an older one just gave up)."""
    free = n_ctx - sum(r.held for r in running) - sum(c.held for c in cached)
    lru = sorted(cached, key=lambda c: c.last_used)
    evict: list[int] = []
    preempt: list[int] = []
    live = sorted(running, key=lambda r: r.arrived)

    def take_cached(need: int) -> None:
        nonlocal free
        while free < need and lru:
            victim = lru.pop(0)
            evict.append(victim.slot)
            free += victim.freed_by_eviction

    # 1–2: one cell per decoding sequence, preempting the newest holder while the pool is short.
    while True:
        decoding = [r for r in live if r.decoding][:n_batch]
        take_cached(len(decoding))
        holders = [r for r in live[1:] if r.held > 0]  # never the oldest: it must always finish
        if free >= len(decoding) or not holders:
            break
        victim = holders[-1]
        live.remove(victim)
        preempt.append(victim.id)
        free += victim.held
    decoding = decoding[:max(free, 0)]  # only when one sequence alone fills the pool: never, as limits go
    chunks = [(r.id, 1) for r in decoding]
    free -= len(decoding)
    budget = n_batch - len(decoding)

    # 3: prompts, oldest first, in what is left of the batch and of the pool. Every decoder will want
    # another cell next step: a newer prompt leaves those free, and starts (fresh, or resumed after a
    # preemption) only when all of it fits beside them — else it would be preempted again at once.
    reserve = len(decoding)
    for r in live:
        if r.decoding or budget <= 0:
            continue
        oldest = r is live[0]
        margin = 0 if oldest else reserve
        if not oldest and not r.has_started and (preempt or not may_start
                                                 or r.pending + margin > free + sum(c.freed_by_eviction for c in lru)):
            break  # first in, first served: later requests would take the cells it waits for
        take_cached(min(r.pending, budget) + margin)
        n = min(r.pending, budget, free - margin)
        if n <= 0:
            break
        chunks.append((r.id, n))
        budget -= n
        free -= n

    # 4: the oldest got nothing (the pool is full of newer requests' cells): the newest holder makes way.
    if live and all(i != live[0].id for i, _ in chunks):
        holders = [r for r in live[1:] if r.held > 0]
        if holders:
            victim = holders[-1]
            rest = [r for r in live if r is not victim]
            after = plan_step(rest, [c for c in cached if c.slot not in evict], n_ctx, n_batch, may_start=False)
            return Step(tuple(evict) + after.evict, tuple(preempt) + (victim.id,) + after.preempt, after.chunks)
    return Step(tuple(evict), tuple(preempt), tuple(chunks))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class SlotView:
    index: int
    active: bool           # a running request holds it
    tokens: tuple[int, ...] | list[int] = ()  # what its cells hold (a cached sequence); () when empty
    last_used: int = 0
    prompt_len: int = 0    # of the cached sequence, the prompt it began with (0: all of it)


@dataclass(frozen=True)
class Choice:
    slot: int
    keep: int                  # cells of the prompt's prefix the request starts with, not evaluated again
    source: int | None = None  # a cached slot to share them from (it keeps its own); None: the slot's own


def choose_slot(prompt: list[int], slots: list[SlotView]) -> Choice | None:
    """Where a new request goes, and what of its prompt is already in the pool; None when every slot
    runs a request.

    The cache sharing the longest prefix with the prompt is taken over when the request continues it:
    the prompt holds all of that cache's own prompt (a next chat turn, or the same prompt again).
    Otherwise the request goes to an empty slot (else the least recently used cache) and shares the
    prefix from that cache
    (llama_memory_seq_cp: the cells are not copied, they belong to both), so the other conversation's
    cache is never cut down for a few shared tokens — a template header, a system prompt — and the same
    prompt sent again still skips what it shares. At least the prompt's last token is always evaluated
    again: its logits are what the first sample is drawn from."""
    idle = [s for s in slots if not s.active]
    if not idle:
        return None

    def shared(slot: SlotView) -> int:
        return min(common_prefix(prompt, list(slot.tokens)), len(prompt) - 1) if slot.tokens else 0

    cached = [s for s in idle if s.tokens]
    best = max(cached, key=lambda s: (shared(s), s.last_used), default=None)
    keep = shared(best) if best is not None else 0
    if best is not None and keep >= max((best.prompt_len or len(best.tokens)) - 1, 2):
        return Choice(best.index, keep)
    empty = [s for s in idle if not s.tokens]
    target = empty[0] if empty else min(cached, key=lambda s: s.last_used)
    if best is not None and target.index == best.index:
        return Choice(target.index, keep)
    return Choice(target.index, keep, best.index if keep else None)
