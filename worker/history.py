"""Fitting a chat's history: the oldest turns go first, system messages and the newest message never.

Used by the worker (to fit the rendered prompt into n_ctx) and by the supervisor (max_history_messages).
"""

from __future__ import annotations

import bisect
import re
from typing import Callable

Message = dict[str, str]  # {"role": …, "content": …}

THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def drop_oldest(messages: list[Message], fits: Callable[[list[Message]], bool]) -> tuple[list[Message], int]:
    """The messages without their oldest turns until `fits` says yes (or only system messages and the
    newest one are left), and how many were dropped. A turn starts with its user message: an assistant
    reply whose question was dropped goes too, since many templates insist that user comes first.

    `fits` must be monotone (dropping more never makes a history stop fitting). It is called O(log n)
    times, each on at most about twice the turns of a history that fits (see fewest_to_drop): a render
    per dropped turn made a 5,000-message chat quadratic, and its worker silent long enough to look hung.
    Its last call is always on the messages returned, so a caller may keep what it computed there."""
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
    ends = turn_ends([messages[i]["role"] for i in droppable])

    def without(turns: int) -> list[Message]:
        # The oldest ends[turns] droppable messages go: before the first one that stays, only the
        # system messages are left.
        cut = droppable[ends[turns]] if ends[turns] < len(droppable) else len(messages) - 1
        return [messages[i] for i in systems[:bisect.bisect_left(systems, cut)]] + messages[cut:]

    tried, refused = -1, False

    def stops(turns: int) -> bool:
        nonlocal tried, refused
        tried, refused = turns, False
        try:
            return fits(without(turns))
        except Exception:
            # A history `fits` cannot judge (a template refusing it) is where the search stops: the
            # confirming call below raises it again if that is the answer, as a turn-by-turn search would.
            refused = True
            return True

    turns = fewest_to_drop(stops, len(ends) - 1)
    kept = without(turns)
    if (tried, refused) != (turns, False):
        fits(kept)
    return kept, ends[turns]


def turn_ends(roles: list[str]) -> list[int]:
    """For the droppable messages' roles, oldest first: how many of them are gone once the oldest 0, 1,
    2, … turns are. A turn is one message and the assistant replies that follow it."""
    ends = [0]
    while ends[-1] < len(roles):
        end = ends[-1] + 1
        while end < len(roles) and roles[end] == "assistant":
            end += 1
        ends.append(end)
    return ends


def fewest_to_drop(stops: Callable[[int], bool], most: int) -> int:
    """The fewest turns, 0…most, whose dropping `stops` accepts (`most` when it accepts none fewer).
    Gallops from the newest end (keeping 0, 1, 3, 7, … turns) and then bisects: O(log most) calls, each
    on at most about twice the turns of a history that fits: the cost follows the context, not the chat."""
    if not stops(most):
        return most
    low, high, step = -1, most, 1  # stops(high); not stops(low), where low = -1 is "not asked"
    while high > 0:
        probe = max(high - step, 0)
        if not stops(probe):
            low = probe
            break
        high, step = probe, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if stops(middle):
            high = middle
        else:
            low = middle
    return high


def strip_thinking(messages: list[Message]) -> list[Message]:
    """Earlier assistant turns without their <think>…</think> reasoning: a thinking model's reasoning is
    for the turn it was made in, and kept in the history it fills the context for nothing."""
    return [{**m, "content": THINKING.sub("", m["content"])} if m["role"] == "assistant" else m for m in messages]
