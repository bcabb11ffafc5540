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
    held: int      # KV cells its sequence holds: the tokens already evaluated
    pending: int   # tokens to evaluate before it can sample its next one (≥ 1)
    arrived: int   # its place in line (smaller = older); the newest is preempted first

    @property
    def decoding(self) -> bool:
        return self.pending == 1


@dataclass(frozen=True)
class Cached:
    """A finished sequence whose cells are kept for a follow-up that shares its prefix."""

    slot: int
    held: int
    last_used: int  # larger = more recent; the least recent goes first


@dataclass(frozen=True)
class Step:
    evict: tuple[int, ...] = ()                # cached slots whose cells are freed
    preempt: tuple[int, ...] = ()              # requests whose cells are freed; back to the queue's head
    chunks: tuple[tuple[int, int], ...] = ()   # (request id, tokens to evaluate), in batch order

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def plan_step(running: list[Running], cached: list[Cached], n_ctx: int, n_batch: int) -> Step:
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
            free += victim.held

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
        if not oldest and r.held == 0 and r.pending + margin > free + sum(c.held for c in lru):
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
            after = plan_step(rest, [c for c in cached if c.slot not in evict], n_ctx, n_batch)
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


def choose_slot(prompt: list[int], slots: list[SlotView]) -> tuple[int, int] | None:
    """(slot, cells to keep) for a new request, or None when every slot runs a request.

    A cached sequence counts as this request's own history when the shared prefix is at least half of
    the prompt (llama-server's slot_prompt_similarity, 0.5: the same prompt again, however long its
    reply was) or at least half of the cache (a second chat turn, however long its new message). The
    longest such wins, its cells kept. Sharing only a few tokens — the BOS, a chat template's header —
    is not enough to cut another conversation's cache down to them: an empty slot comes first, then the
    least recently used cache, of which the shared prefix is still kept. At least the prompt's last
    token is always evaluated again: its logits are what the first sample is drawn from."""
    best: tuple[tuple, int, int] | None = None
    for slot in slots:
        if slot.active:
            continue
        keep = min(common_prefix(prompt, list(slot.tokens)), len(prompt) - 1) if slot.tokens else 0
        continues = keep > 0 and (2 * keep >= len(prompt) or 2 * keep >= len(slot.tokens))
        rank = (continues, keep if continues else 0, not slot.tokens, -slot.last_used)
        if best is None or rank > best[0]:
            best = (rank, slot.index, keep)
    return None if best is None else (best[1], best[2])
