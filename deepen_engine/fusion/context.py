"""What the fusion methods read about an ensemble's members, computed once per ensemble and
shared by every fuser made from it (`Ensemble.with_fusion` views included):

- which tokens have text and which end the text, per member;
- token maps between members (`token_map`): the token of another member that writes a
  token's text, or the longest start of it (for the union methods);
- relative spaces over the anchors (`spaces`, for DeePEn), with their in-memory row caches
  and the on-disk row store (alignment/row_store.py), each on its member's device;
- each member's DeePEn index tables (`member_tables`, fusion/tables.py): built once, not
  per fuser, though `main="auto"` makes a fuser per request;
- copies of the tables above on the devices that read them (`copies`, deepen_engine/devices.py).

Everything is built on first use, so a method that does not need it never pays for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..alignment.relative import RelativeSpace
from ..alignment.row_store import RowStore, embedding_digest
from ..alignment.token_texts import TextSequence
from ..alignment.vocabulary import Anchors
from ..devices import DeviceCopies
from ..members import Member, cache_dir
from .tables import MemberTables

MAX_SPACE_SETTINGS = 4
"""Relative-space settings (tau, caches) kept at once per ensemble: the ensemble's own and
the three used most recently by requests with another `tau`. One evicted is rebuilt
(its rows computed again, or read from the disk cache) when a request uses it again."""


def cache_view(views: dict[str, Any], key: str, view: Any, size: int, own_tau: float) -> None:
    """Add an ensemble's fusion view to its cache (`Ensemble.view`: key -> view, oldest
    first), keeping at most `size` views, and views of at most `MAX_SPACE_SETTINGS - 1`
    taus other than `own_tau` (the most recently added kept): each tau's relative spaces
    and row caches live as long as a view holds them, so a client trying many taus would
    otherwise keep a row cache per tau alive.
    """
    if len(views) >= size:
        views.pop(next(iter(views)))  # the oldest
    views[key] = view
    taus = [v.fusion.tau for v in reversed(views.values()) if v.fusion.tau != own_tau]
    old = set(list(dict.fromkeys(taus))[MAX_SPACE_SETTINGS - 1 :])  # taus newest first
    for stale in [k for k, v in views.items() if v.fusion.tau in old]:
        del views[stale]


END = b""
"""The key of end-of-text tokens in `FusionContext.keys` (no token's text is empty)."""


class EndKeys(TextSequence):
    """A member's token texts read with `END` in place of its end tokens' (a view: the
    vocabulary's texts are not copied).
    """

    __slots__ = ("_texts", "_ends")

    def __init__(self, texts: Sequence[bytes | None], ends: frozenset[int]) -> None:
        self._texts = texts
        self._ends = frozenset(t for t in ends if 0 <= t < len(texts))

    def __len__(self) -> int:
        return len(self._texts)

    def _at(self, index: int) -> bytes | None:
        return END if index in self._ends else self._texts[index]

    def __iter__(self) -> Iterator[bytes | None]:
        ends = self._ends
        for idx, text in enumerate(self._texts):
            yield END if idx in ends else text


class FusionContext:
    """The members' vocabularies and derived tables, shared by the fusers of one ensemble."""

    def __init__(self, members: Sequence[Member], anchors: Anchors | None) -> None:
        self.members = list(members)
        self.anchors = anchors or Anchors(texts=[], token_ids=[], token_to_anchor=[])
        self.has_text = [
            torch.tensor([t is not None for t in m.vocab.texts], dtype=torch.bool) for m in members
        ]
        self.end_ids = [frozenset(m.eos_ids) for m in members]
        # relative spaces by (tau, row cache size, disk rows), least recently used first;
        # the first settings made (the ensemble's own) stay, MAX_SPACE_SETTINGS in all
        self._spaces: OrderedDict[tuple[float, int, int], list[RelativeSpace]] = OrderedDict()
        self._first_spaces: tuple[float, int, int] | None = None
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._keys: dict[int, EndKeys] = {}
        self._digests: dict[int, str] = {}
        self._tables: dict[int, MemberTables] = {}
        self.copies = DeviceCopies()  # the tables on the devices that read them
        # row-steps every fuser of the ensemble (views included) was asked to fuse, of
        # those the gate skipped, and the seconds spent in `fuse` (the server's metrics and
        # the bench; `FuseStats` is per fuser)
        self.fusion_rows = 0
        self.gated_rows = 0
        self.fusion_seconds = 0.0

    def keys(self, i: int) -> Sequence[bytes | None]:
        """Member i's token id -> its text, `END` for its end tokens, None for other
        special tokens (no text: they never enter a union).
        """
        if i not in self._keys:
            self._keys[i] = EndKeys(self.members[i].vocab.texts, self.end_ids[i])
        return self._keys[i]

    def token_map(self, source: int, target: int) -> torch.Tensor:
        """(V_source,) long: for each token of member `source`, the token of member
        `target` that writes its text; when `target` has no token with that text, its
        longest token whose text starts it (the rest is written by later steps); `END`
        maps to the target's first end token; -1 where none exists (special tokens, or no
        target token starts the text).
        """
        if (source, target) not in self._maps:
            by_text = self.members[target].vocab.text_to_id()
            self._maps[source, target] = _token_map(
                self.keys(source), by_text, self.end_ids[target]
            )
        return self._maps[source, target]

    def member_tables(self, i: int) -> MemberTables:
        """Member i's DeePEn index tables (the same for every fuser: anchors are fixed)."""
        if i not in self._tables:
            self._tables[i] = MemberTables.build(self.anchors.token_to_anchor[i], self.has_text[i])
        return self._tables[i]

    def spaces(self, tau: float, cache_size: int, disk_rows: int) -> list[RelativeSpace]:
        """One relative space per member over the anchors, shared by fusers with the same
        settings; with `disk_rows > 0` their non-anchor rows persist on disk.
        """
        key = (tau, cache_size, disk_rows)
        if key in self._spaces:
            self._spaces.move_to_end(key)
            return self._spaces[key]
        if self._first_spaces is not None:  # another tau or cache: share their anchors
            first = self._spaces[self._first_spaces]
            spaces = [
                space.with_settings(tau, cache_size, self._store(i, tau, disk_rows))
                for i, space in enumerate(first)
            ]
        else:
            spaces = [
                RelativeSpace(
                    m.input_embedding_weight(),
                    self.anchors.token_ids[i],
                    self.anchors.token_to_anchor[i],
                    tau=tau,
                    cache_size=cache_size,
                    store=self._store(i, tau, disk_rows),
                )
                for i, m in enumerate(self.members)
            ]
        self._spaces[key] = spaces
        if self._first_spaces is None:
            self._first_spaces = key
        if len(self._spaces) > MAX_SPACE_SETTINGS:
            # the least recently used but the first: requests with their own tau would
            # otherwise each keep row caches of up to `cache_size` rows per member for good
            del self._spaces[next(k for k in self._spaces if k != self._first_spaces)]
        return spaces

    def rows_cached(self) -> list[int]:
        """Per member: the non-anchor relative rows its spaces cache now (all settings)."""
        counts = [0] * len(self.members)
        for spaces in self._spaces.values():
            for i, space in enumerate(spaces):
                counts[i] += space.rows_cached
        return counts

    def _store(self, i: int, tau: float, disk_rows: int) -> RowStore | None:
        """Member i's on-disk row store for these anchors and tau (None: disk cache off)."""
        if disk_rows == 0 or not self.anchors.texts:
            return None
        if i not in self._digests:
            weight = self.members[i].input_embedding_weight()
            self._digests[i] = embedding_digest(weight)
        return RowStore.for_space(
            cache_dir() / "relative-rows",
            member_digest=self._digests[i],
            anchor_ids=self.anchors.token_ids[i],
            tau=tau,
            max_rows=disk_rows,
        )


def _token_map(
    source: Sequence[bytes | None], by_text: dict[bytes, int], target_end: frozenset[int]
) -> torch.Tensor:
    """See `FusionContext.token_map`; `by_text` is the target's text -> id. One pass over
    the source vocabulary (dict lookups of the text and its prefixes, longest first).
    """
    longest = max((len(t) for t in by_text), default=0)
    end = min(target_end) if target_end else -1
    out = [-1] * len(source)
    for idx, text in enumerate(source):
        if text is None:
            continue
        if text == END:
            out[idx] = end
            continue
        hit = by_text.get(text)
        length = min(len(text) - 1, longest)
        while hit is None and length > 0:
            hit = by_text.get(text[:length])
            length -= 1
        if hit is not None:
            out[idx] = hit
    return torch.tensor(out, dtype=torch.long)
