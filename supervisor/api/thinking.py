"""A thinking model's reply split as Ollama's `think` asks: the reasoning between <think> and </think>
at its start goes to `thinking`, the rest to `content`. Streamed text may cut a tag in two: what could
still be the start of one is held back until the next piece says."""

from __future__ import annotations

import functools

from jinja2.sandbox import ImmutableSandboxedEnvironment

OPEN, CLOSE = "<think>", "</think>"


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@functools.lru_cache(maxsize=32)
def opens_thinking(template: str) -> bool:
    """Whether a chat template's generation prompt leaves a <think> open (DeepSeek-R1's newer templates,
    QwQ, Qwen3's thinking-only models): the reply then starts with reasoning and only closes it. Found by
    rendering a one-message chat with and without the generation prompt, as the worker renders it — the
    template's text alone misleads (Qwen3's hybrid writes `<think></think>` to turn thinking off; others
    open it in one branch only). Cached: the template is rendered once per model."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=lambda message: "", strftime_now=lambda fmt: "")
    messages = [{"role": "user", "content": "hello"}]
    try:
        rendered = env.from_string(template)
        base, full = (rendered.render(messages=messages, add_generation_prompt=prompt, bos_token="", eos_token="")
                      for prompt in (False, True))
    except Exception:  # a template this context cannot render: the worker's own error is what users see
        return False
    added = full[len(base):] if full.startswith(base) else full
    return added.rfind(OPEN) > added.rfind(CLOSE)


class ThinkSplit:
    def __init__(self, opened: bool = False) -> None:
        # "start" → "thinking" → "content", or "start" → "content" for a reply without reasoning. With
        # `opened` (the prompt opened the reasoning itself: opens_thinking) "start" leads to "thinking"
        # whether or not the model writes <think> again, as distilled models often do.
        self._opened = opened
        self._state = "start"
        self._held = ""
        self._strip = False  # the whitespace after </think> is the template's, not the answer's

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, content) of this piece of the reply, as far as can be told yet."""
        held = self._held + text
        self._held = ""
        thinking = ""
        if self._state == "start":
            stripped = held.lstrip()
            if stripped.startswith(OPEN):
                self._state, held = "thinking", stripped[len(OPEN):]
            elif OPEN.startswith(stripped):  # nothing yet, or a tag still arriving
                self._held = held
                return "", ""
            else:
                self._state = "thinking" if self._opened else "content"
        if self._state == "thinking":
            end = held.find(CLOSE)
            if end < 0:
                keep = held_back(held, CLOSE)
                self._held = held[len(held) - keep:]
                return held[:len(held) - keep], ""
            thinking, held = held[:end], held[end + len(CLOSE):]
            self._state, self._strip = "content", True
        if self._strip:
            held = held.lstrip()
            self._strip = not held
        return thinking, held

    def end(self) -> tuple[str, str]:
        """What was held back, once the reply is complete: an unfinished tag is text after all."""
        held, self._held = self._held, ""
        thinking = self._state == "thinking" or (self._state == "start" and self._opened)
        return (held, "") if thinking else ("", held)
