"""Turning the main member's tokens into final text: UTF-8 assembly and stop strings.

Tokens are turned into bytes through the member's canonical vocabulary (the same bytes the
tokenizer decodes to), and bytes into text by an incremental UTF-8 decoder, which holds an
incomplete character back until its last byte arrives. Stop strings are matched on the text;
a tail that could still become a stop string is held back from the stream until decided.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Accumulates token bytes into text, cuts at stop strings, and yields final deltas."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self.text = ""  # all complete text so far (cut at a stop string once one is found)
        self.stopped = False
        self._emitted = 0  # characters of `text` already handed out as deltas

    def add(self, data: bytes) -> str:
        """Add one token's bytes; return the newly completed text (may be empty)."""
        if self.stopped:
            return ""
        piece = self._decoder.decode(data)
        if not piece:
            return ""
        before = len(self.text)
        self.text += piece
        self._check_stop(search_from=before)
        return self.text[before:]

    @property
    def held(self) -> bytes:
        """Bytes of an incomplete character held back (not yet in `text`)."""
        return bytes(self._decoder.getstate()[0])

    def preview(self, pieces: Sequence[bytes]) -> list[str]:
        """The text after adding each of `pieces` in turn (stop strings not applied),
        without adding them: a speculative draft's texts.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate(self._decoder.getstate())
        text, out = self.text, []
        for data in pieces:
            text += decoder.decode(data)
            out.append(text)
        return out

    def finish(self) -> str:
        """Flush bytes of an incomplete character (as U+FFFD) at the end of generation."""
        if self.stopped:
            return ""
        piece = self._decoder.decode(b"", final=True)
        before = len(self.text)
        self.text += piece
        self._check_stop(search_from=before)
        return self.text[before:]

    def delta(self, final: bool = False) -> str:
        """Text that is now certain and not yet handed out.

        Unless `final`, a tail that is a prefix of a stop string is held back.
        """
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._pending_stop_prefix()
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _check_stop(self, search_from: int) -> None:
        if not self._stop:
            return
        longest = max(len(s) for s in self._stop)
        start = max(0, search_from - longest + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _pending_stop_prefix(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
