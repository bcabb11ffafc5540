"""Fitting a chat's history: the oldest turns go first, system messages and the newest message never.

Used by the worker (to fit the rendered prompt into n_ctx) and by the supervisor (max_history_messages).
"""

from __future__ import annotations

import re
from typing import Callable

Message = dict[str, str]  # {"role": …, "content": …}

THINKING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def drop_oldest(messages: list[Message], fits: Callable[[list[Message]], bool]) -> tuple[list[Message], int]:
    """The messages without their oldest turns until `fits` says yes (or only system messages and the
    newest one are left), and how many were dropped. A turn starts with its user message: an assistant
    reply whose question was dropped goes too, since many templates insist that user comes first."""
    kept = list(messages)
    dropped = 0

    def first_turn() -> int | None:
        return next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)

    while not fits(kept) and (i := first_turn()) is not None:
        del kept[i]
        dropped += 1
        while (i := first_turn()) is not None and kept[i]["role"] == "assistant":
            del kept[i]
            dropped += 1
    return kept, dropped


def strip_thinking(messages: list[Message]) -> list[Message]:
    """Earlier assistant turns without their <think>…</think> reasoning: a thinking model's reasoning is
    for the turn it was made in, and kept in the history it fills the context for nothing."""
    return [{**m, "content": THINKING.sub("", m["content"])} if m["role"] == "assistant" else m for m in messages]
