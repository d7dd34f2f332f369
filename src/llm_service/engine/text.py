"""Turning token bytes into safe text: whole UTF-8 characters, stop strings never half-emitted."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["ReasoningSplitter", "StreamDecoder", "partial_marker"]


class StreamDecoder:
    """Incremental decoder for one generation.

    Bytes of each token go in; text that is safe to show comes out. An incomplete multi-byte
    character is held until it completes. Text that could be the start of a stop string is held
    until it is either ruled out (then released) or completes the stop string (then generation
    ends and the stop string is dropped).
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._pending = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be emitted now.

        After a stop string is found, ``stopped`` is True and later pushes return "".
        """
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(data)
        return self._release()

    def finish(self) -> str:
        """End of generation: flush what is held (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(b"", final=True)
        out, self._pending = self._pending, ""
        return out

    def _release(self) -> str:
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        found = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            out, self._pending = self._pending[: min(found)], ""
            return out
        hold = self._partial_stop_length()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        text = self._pending
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningSplitter:
    """Splits a reasoning model's answer into its reasoning and its content, as it streams.

    The reasoning is the text of a ``<think>...</think>`` block at the start of the answer (as
    DeepSeek-R1 and Qwen3 write it; llama-server and vLLM split it the same way). A template
    that opens the block itself (its prompt ends with ``<think>``) makes the answer start
    inside it. A ``<think>`` later in the answer is content. The tags are part of neither.
    """

    def __init__(self, *, inside: bool = False) -> None:
        self._state = "inside" if inside else "start"
        self._pending = ""  # a possible (partial) tag, or leading whitespace, held

    def feed(self, text: str) -> tuple[str, str]:
        """(content, reasoning) that can be shown now."""
        self._pending += text
        content = reasoning = ""
        if self._state == "start":
            head = self._pending.lstrip()
            if head.startswith(THINK_OPEN):
                self._state, self._pending = "inside", head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):  # (empty, or a part of the tag): wait
                return "", ""
            else:
                self._state = "after"
        if self._state == "inside":
            at = self._pending.find(THINK_CLOSE)
            if at < 0:
                keep = len(self._pending) - partial_marker(self._pending, THINK_CLOSE)
                reasoning, self._pending = self._pending[:keep], self._pending[keep:]
                return "", reasoning
            reasoning = self._pending[:at]
            self._state, self._pending = "after_close", self._pending[at + len(THINK_CLOSE) :]
        if self._state == "after_close":  # the whitespace between the block and the answer
            self._pending = self._pending.lstrip()
            if not self._pending:
                return "", reasoning
            self._state = "after"
        content, self._pending = self._pending, ""
        return content, reasoning

    def finish(self) -> tuple[str, str]:
        """The end of the answer: what was held (an unclosed block is all reasoning)."""
        held, self._pending = self._pending, ""
        if self._state == "inside":
            return "", held
        return ("" if self._state == "after_close" else held), ""


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that begins ``marker`` (and is not all of it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
