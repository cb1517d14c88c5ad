"""`TokenTexts`: the text of every token id of a member, stored compactly.

A list of 262,144 `bytes` objects (Gemma-3's vocabulary, 7.7 bytes of text each on
average) takes 14 MB: 33 bytes of object header per text, rounded up, and a pointer.
Here the texts are one `bytes` string and an array of where each ends: 3 MB. Reading a
text makes a small `bytes` object then (a slice), which the caller drops when done.
"""

from __future__ import annotations

from abc import abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

_OFFSET = "I"  # unsigned 32-bit: texts up to 4 GiB in all


class TextSequence(Sequence[bytes | None]):
    """Token id -> text, read by id (negative ids count from the end) or by slice (a list);
    a subclass gives `_at(i)` for `0 <= i < len(self)`.
    """

    __slots__ = ()

    @abstractmethod
    def _at(self, index: int) -> bytes | None: ...

    @overload
    def __getitem__(self, index: int) -> bytes | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes | None]: ...

    def __getitem__(self, index: int | slice) -> bytes | None | list[bytes | None]:
        size = len(self)
        if isinstance(index, slice):
            return [self._at(i) for i in range(*index.indices(size))]
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"token id {index} out of range (0..{size - 1})")
        return self._at(index)


class TokenTexts(TextSequence):
    """Token id -> its UTF-8 text, or None for a token without text (special tokens).

    No text is empty: `b""` given to the constructor reads back as None. Compares equal to
    a sequence with the same items (a list of `bytes | None`).
    """

    __slots__ = ("_blob", "_ends")

    def __init__(self, texts: Iterable[bytes | None]) -> None:
        blob = bytearray()
        ends = array(_OFFSET)
        for text in texts:  # each text is dropped once copied: no list of them at once
            if text:
                blob += text
            ends.append(len(blob))  # OverflowError past 4 GiB
        self._blob = bytes(blob)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def _at(self, index: int) -> bytes | None:
        start = self._ends[index - 1] if index else 0
        return self._blob[start : self._ends[index]] or None

    def __iter__(self) -> Iterator[bytes | None]:
        blob, start = self._blob, 0
        for end in self._ends:
            yield blob[start:end] or None
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenTexts):
            return self._ends == other._ends and self._blob == other._blob
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which have no hash

    def __repr__(self) -> str:
        return f"TokenTexts({len(self)} tokens, {len(self._blob)} bytes of text)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._blob, self._ends))


def _restore(blob: bytes, ends: array) -> TokenTexts:  # type: ignore[type-arg]
    """A `TokenTexts` from its parts (unpickling)."""
    texts = TokenTexts(())
    texts._blob, texts._ends = blob, ends
    return texts
