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


def test_a_prompt_that_opened_the_reasoning_starts_in_it():
    s = ThinkSplit(opened=True)
    assert s.feed("Okay, the user wants") == ("Okay, the user wants", "")
    assert s.feed(" a greeting.\n</th") == (" a greeting.\n", "")
    assert s.feed("ink>\n\nHello!") == ("", "Hello!")
    assert split_opened(["<think>", "\nhmm</think>hi"]) == ("\nhmm", "hi")  # the tag written again is dropped
    assert split_opened(["<thi"]) == ("<thi", "")


def split_opened(pieces: list[str]) -> tuple[str, str]:
    s = ThinkSplit(opened=True)
    out = [s.feed(piece) for piece in pieces] + [s.end()]
    return "".join(t for t, _ in out), "".join(c for _, c in out)


def test_which_templates_open_the_reasoning():
    from supervisor.api.thinking import opens_thinking

    deepseek = "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
    qwen3_hybrid = ("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
                    "defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
    chatml = "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
    assert opens_thinking(deepseek) and not opens_thinking(qwen3_hybrid) and not opens_thinking(chatml)
    # Branches decide, not the text: a flag nobody passes, and thinking opened unless told otherwise.
    optional = "{%- if add_generation_prompt %}A:{%- if enable_thinking %}{{ '<think>\\n' }}{%- endif %}{%- endif %}"
    nemotron = ("{% if add_generation_prompt %}A:{% if thinking is false %}<think></think>{% else %}<think>\\n"
                "{% endif %}{% endif %}")
    assert not opens_thinking(optional) and opens_thinking(nemotron)
    assert not opens_thinking("") and not opens_thinking("{% if %}")  # unrenderable: no
