"""A thinking model's reply split as Ollama's `think` asks: the reasoning between <think> and </think>
at its start goes to `thinking`, the rest to `content`. Streamed text may cut a tag in two: what could
still be the start of one is held back until the next piece says."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def opens_thinking(template: str) -> bool:
    """Whether a chat template's generation prompt ends inside an opened <think> (DeepSeek-R1's newer
    templates, QwQ, Qwen3's thinking-only models): the reply then starts with reasoning and only closes
    it. Qwen3's hybrid template, which writes `<think>\n\n</think>` to turn thinking off, does not."""
    at = template.rfind("add_generation_prompt")
    if at < 0:
        return False
    part = template[at:]
    end = part.find("endif")
    part = part[:end] if end >= 0 else part
    return OPEN in part and CLOSE not in part


class ThinkSplit:
    def __init__(self, opened: bool = False) -> None:
        # "start" → "thinking" → "content", or "start" → "content" for a reply without reasoning;
        # "thinking" at once when the prompt opened the reasoning itself (opens_thinking).
        self._state = "thinking" if opened else "start"
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
                self._state = "content"
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
        return (held, "") if self._state == "thinking" else ("", held)
