"""Turning token bytes into safe text: whole UTF-8 characters, stop strings never half-emitted."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["StreamDecoder"]


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
