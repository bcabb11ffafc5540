"""Ollama's `think` split, pure: whatever pieces a reply streams in, the split is the same."""

from __future__ import annotations

from hypothesis import given, strategies as st

from supervisor.api.thinking import ThinkSplit


def split(pieces: list[str]) -> tuple[str, str]:
    s = ThinkSplit()
    thinking = content = ""
    for piece in pieces:
        t, c = s.feed(piece)
        thinking, content = thinking + t, content + c
    t, c = s.end()
    return thinking + t, content + c


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({min(p, len(text)) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@given(st.text(alphabet="ab<>/think \n", max_size=20), st.text(alphabet="ab<>/think \n", max_size=20),
       st.lists(st.integers(0, 60), max_size=8))
def test_reasoning_goes_to_thinking_however_the_stream_is_cut(reasoning, answer, points):
    if "</think>" in reasoning:
        return
    text = f"<think>{reasoning}</think>\n\n{answer}"
    assert split(cut(text, points)) == (reasoning, answer.lstrip())


@given(st.text(max_size=30), st.lists(st.integers(0, 40), max_size=6))
def test_a_reply_without_reasoning_is_all_content(text, points):
    if text.lstrip().startswith("<think>"):
        return
    assert split(cut(text, points)) == ("", text)


def test_an_unfinished_tag_or_reasoning_is_kept():
    assert split(["<thi"]) == ("", "<thi")
    assert split(["<think>still going"]) == ("still going", "")
    assert split(["<think>a</th"]) == ("a</th", "")
