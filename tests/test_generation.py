"""A request's text stream without a model: detokenisation, stop matching, limits and cancellation."""

from __future__ import annotations

from hypothesis import given, strategies as st

from worker.generation import CANCELLED, END_OF_TEXT, LENGTH, STOP, Outcome, Sampling, StopMatcher, TextStream

EOS = -1


class ByteEngine:
    """Emits pre-cut byte pieces as tokens: lets a test split UTF-8 sequences across tokens."""

    def __init__(self, pieces: list[bytes], then_eos: bool = False) -> None:
        self.pieces = pieces
        self.then_eos = then_eos

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def tokens(self):
        yield from range(len(self.pieces))
        if self.then_eos:
            yield EOS
        while True:  # a model never stops on its own; the stream must
            yield len(self.pieces) - 1


def run(engine, sampling=Sampling(), n_ctx=1000, prompt=(1, 2)):
    """Feed the stream as the batch loop does, one sampled token at a time, until it is finished."""
    stream = TextStream(engine, len(prompt), sampling, n_ctx, Outcome())
    pieces = []
    for token in engine.tokens():
        piece = stream.feed(token)
        if piece is not None:
            pieces.append(piece)
        if stream.finished:
            break
    return "".join(p.text for p in pieces), stream.outcome, pieces


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for size in sizes:
        if i >= len(data):
            break
        out.append(data[i:i + size])
        i += size
    if i < len(data):
        out.append(data[i:])
    return out


@given(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 4), min_size=1, max_size=60))
def test_utf8_split_across_tokens_comes_out_whole(text, sizes):
    pieces = cut(text.encode("utf-8"), sizes)
    out, outcome, _ = run(ByteEngine(pieces, then_eos=True))
    assert out == text
    assert outcome.finish_reason == END_OF_TEXT and outcome.completion_tokens == len(pieces)


def test_broken_utf8_becomes_replacement_characters_not_silence():
    out, _, _ = run(ByteEngine([b"ok ", b"\xe6\x97", b"!"], then_eos=True))
    assert out == "ok \ufffd!"


@given(st.text(alphabet="abc", min_size=0, max_size=30), st.text(alphabet="abc", min_size=1, max_size=4),
       st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_stop_matching_equals_cutting_the_whole_text(text, stop, sizes):
    matcher = StopMatcher([stop])
    sent, stopped, i = [], False, 0
    for size in sizes + [len(text)]:
        piece, stopped = matcher.feed(text[i:i + size])
        sent.append(piece)
        i += size
        if stopped or i >= len(text):
            break
    if not stopped:
        sent.append(matcher.flush())
    whole = "".join(sent)
    if stop in text:
        assert stopped and whole == text[: text.index(stop)]
    else:
        assert not stopped and whole == text


def test_stop_across_tokens_ends_with_stop():
    engine = ByteEngine([b"hello ", b"wo", b"rld", b" again"])
    out, outcome, _ = run(engine, Sampling(stop=("world",)))
    assert (out, outcome.finish_reason, outcome.completion_tokens) == ("hello ", STOP, 3)


def test_max_tokens_and_the_context_limit_end_with_length():
    _, outcome, pieces = run(ByteEngine([b"a"] * 3), Sampling(max_tokens=10))
    assert (outcome.finish_reason, outcome.completion_tokens) == (LENGTH, 10)
    assert sum(p.tokens for p in pieces) == 10
    _, outcome, _ = run(ByteEngine([b"a"]), Sampling(), n_ctx=12, prompt=range(8))
    assert (outcome.finish_reason, outcome.completion_tokens) == (LENGTH, 4)  # the context holds 12 in all


def test_a_cancelled_stream_ends_with_what_it_held_back_and_counts_every_token():
    stream = TextStream(ByteEngine([b"ab", b"\xe6"]), 1, Sampling(stop=("bz",)), 10_000, Outcome())
    first = stream.feed(0)  # "ab": "b" could start the stop sequence, so it is held back
    second = stream.feed(1)  # half a character
    tail = stream.end(CANCELLED)
    assert (first.text, second, tail.text) == ("a", None, "b\ufffd")
    assert sum(p.tokens for p in (first, tail)) == 2
    assert stream.outcome.finish_reason == CANCELLED and stream.finished
    assert stream.end(LENGTH) is None and stream.outcome.finish_reason == CANCELLED  # once over, over


def test_a_stop_word_that_is_a_control_token_ends_the_request_by_its_id():
    # `<|im_start|>` and its kind come out of a model as no text at all: only the id can stop it.
    engine = ByteEngine([b"Hi", b" there", b"", b"user: more"])
    stream = TextStream(engine, 2, Sampling(stop=("<|im_start|>",)), 1000, Outcome(), stop_tokens=frozenset({2}))
    pieces = [stream.feed(token) for token in (0, 1, 2)]
    assert stream.finished and stream.outcome.finish_reason == STOP
    assert "".join(p.text for p in pieces if p is not None) == "Hi there"
    assert stream.outcome.completion_tokens == 2  # the stop token is not the reply's, as EOS is not
