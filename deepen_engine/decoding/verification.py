"""Helpers reading a speculative step's drafts (speculative.py, steps 2-3).

Every helper is synced to each row's whole drafted text (`MemberBatch.plan_sync`) and
reads it in one forward that keeps the logits after every fed position. The helper's
distribution at position t (after t drafted tokens) is one plain decoding would see only
where its sync to the text at t gives ids that are a prefix of the ids fed, their last one
fed in this forward. Another position is a gap: its logits are None until the step
re-syncs the helper there (`resync`: roll back to the ids the text at t gives, and feed
them in one more forward), which it does only for rows whose drafts were kept all the way
to the gap. The logits read before a re-sync stay valid after it: they are values, not
views of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cross_drafts import HelperDraft
from .drafts import Draft, copy_ids, fed_logits, fits, forward_keeping, starts
from .member_batch import MemberBatch
from .row_ids import RowIds

Plan = tuple[list[int], list[int]]  # a helper row's ids and byte ends (`plan_sync`)


@dataclass
class HelperReads:
    """One helper's reading of every row's draft."""

    batch: MemberBatch
    before: list[RowIds]  # each row's ids before the draft (the roll-back's start)
    plans: list[list[Plan]]  # per row, its ids after drafted tokens 1, 2, ...
    logits: list[list[torch.Tensor | None]]  # per row, (V_i,) at positions 0.. (None: a gap)


def read_drafts(
    batch: MemberBatch, drafts: Sequence[Draft], drafted: HelperDraft | None
) -> HelperReads:
    """A helper's logits at every position of every row's draft, in one forward (module
    docstring). `drafts[b].positions` is cut to what the helper's context window holds;
    `drafted` is the helper's own draft when it drafted this step (it fed its ids then and
    keeps those logits).
    """
    before = drafted.before if drafted else [copy_ids(r) for r in batch.rows]
    # rows whose last ids wait for this forward (`helpers_wait`): position 0 is read off
    # it, unless the draft re-tokenises those ids; then they are fed first
    waiting = [not drafted and r.cached < len(r.ids) for r in batch.rows]
    plans = [
        [batch.plan_sync(before[b], text) for text in d.texts[1 : d.positions]]
        for b, d in enumerate(drafts)
    ]
    window = batch.member.context_window
    for b, d in enumerate(drafts):  # feed no more than the member's window holds
        while d.positions > 1 and not fits(plans[b][d.positions - 2][0], window):
            d.positions -= 1
    if any(
        waiting[b] and d.positions > 1 and not starts(plans[b][d.positions - 2][0], r.ids)
        for b, (d, r) in enumerate(zip(drafts, before))
    ):
        batch.forward()
        waiting = [False] * len(waiting)
    now = drafted.start if drafted else batch.require_logits()  # (B, V_i) position 0
    for b, d in enumerate(drafts):
        if d.positions > 1:
            batch.apply_plan(b, plans[b][d.positions - 2])
    if not drafted:
        batch.fed_logits = [[] for _ in batch.rows]
    forward_keeping(batch)
    logits: list[list[torch.Tensor | None]] = []
    for b, d in enumerate(drafts):
        first = fed_logits(batch, b, len(before[b].ids) - 1) if waiting[b] else now[b]
        assert first is not None  # a waiting row feeds at least its last id
        row: list[torch.Tensor | None] = [first]
        fed = batch.rows[b].ids
        for t in range(1, d.positions):
            ids = plans[b][t - 1][0]
            at = fed_logits(batch, b, len(ids) - 1)
            row.append(at if at is not None and ids == fed[: len(ids)] else None)
        logits.append(row)
    batch.fed_logits = []
    return HelperReads(batch, before, plans, logits)


def resync(reads: HelperReads, at: dict[int, int]) -> None:
    """Fill the gaps at `at[b]` (row b's position) by syncing each such row to the text
    there and feeding it, all rows in one forward (module docstring).
    """
    batch = reads.batch
    gaps = {b: t for b, t in at.items() if reads.logits[b][t] is None}
    if not gaps:
        return
    for b, t in gaps.items():
        batch.apply_plan(b, reads.plans[b][t - 1])
        r = batch.rows[b]
        if r.cached == len(r.ids):  # ids the cache holds already: feed the last one again
            batch.replace_ids(b, len(r.ids) - 1, r.ids[-1:])
    batch.fed_logits = [[] for _ in batch.rows]
    forward_keeping(batch)
    for b, t in gaps.items():
        found = fed_logits(batch, b, len(reads.plans[b][t - 1][0]) - 1)
        assert found is not None
        reads.logits[b][t] = found
    batch.fed_logits = []
