"""A member's batch whose KV cache and forward passes live in another process (a Ray
actor: remote/backend.py), behind the same interface as `MemberBatch`.

The coordinator keeps each row's ids and syncs helpers to the shared text here, with the
member's own tokenizer, exactly as `MemberBatch` does; the actor holds an ordinary
`MemberBatch` with the cache. Between two forwards the batch notes, per row, how many
leading ids the actor still holds unchanged (`_same`); `forward` sends one
`StepRequest` with the batch operations queued since the last call and each changed
row's new ids, and reads back what fusion needs (protocol.py). Operations that need
no answer (rows kept, batches merged) wait for the next call, so a step costs one round
trip per member.

Prompt scores (decoding/prompt_scores.py) are computed in the actor, from its prefill's
logits: the loop sets `score_prompts` and each row's `score.span` after the batch is made
and before its first forward, so the batch's `Open`, sent with that first call, carries
the spans; each reply of a scoring batch carries the rows' score sums, copied into
`rows[b].score` here.

`new_batch` picks this class for members that run elsewhere (`Member.remote` set).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from typing import Protocol, cast

import torch

from ..decoding.member_batch import MemberBatch
from ..errors import MemberError
from ..members import Member
from .protocol import (
    EditIds,
    KeepRows,
    Merge,
    Op,
    Open,
    StepReply,
    StepRequest,
    TakeRows,
    TopLogits,
)

_batch_ids = itertools.count()  # actor-side batch names, unique in this process


class LinkStats:
    """What crossed a link so far: calls, row-steps, payload bytes, seconds."""

    def __init__(self) -> None:
        self.calls = 0
        self.row_steps = 0  # rows answered, summed over calls
        self.sent_bytes = 0
        self.received_bytes = 0
        self.wall_seconds = 0.0  # the coordinator's wait, transfers included
        self.actor_seconds = 0.0  # the actor's forward passes

    def snapshot(self) -> dict[str, float]:
        """The counters as a dict (subtract two snapshots to measure a stretch)."""
        return dict(vars(self))


class MemberLink(Protocol):
    """How a batch reaches the process that runs its member."""

    stats: LinkStats

    def step(self, request: StepRequest) -> StepReply:
        """Run one step there; raises `MemberError` naming the member when the process
        died or did not answer in time.
        """
        ...

    def free(self, batch: int) -> None:
        """Drop a batch there, without waiting; never raises."""
        ...


def new_batch(member: Member, prompts_ids: list[list[int]]) -> MemberBatch:
    """The batch for a member: in this process, or a proxy for one running elsewhere."""
    if member.remote is not None:
        return RemoteMemberBatch(member, prompts_ids)
    return MemberBatch(member, prompts_ids)


class RemoteMemberBatch(MemberBatch):
    """`MemberBatch`'s interface for a member in another process (module docstring)."""

    def __init__(self, member: Member, prompts_ids: list[list[int]]) -> None:
        super().__init__(member, prompts_ids)
        self.link: MemberLink = member.remote
        self.vocab_size = len(member.vocab.texts)
        self.top: TopLogits | None = None  # what fusion reads, when not full `logits`
        self._open(prompts_ids)

    def _open(self, prompts_ids: list[list[int]]) -> None:
        """Name a new actor-side batch; it is created with the next call."""
        self.batch_id = next(_batch_ids)
        self._opening = Open(self.batch_id, [list(p) for p in prompts_ids])
        self._ops: list[Op] = [self._opening]
        self._opened = False  # whether the actor has heard of this batch
        self._opened_rows = list(self.rows)  # the rows the Open makes, in its order
        self._held = [len(p) for p in prompts_ids]  # ids the actor holds, per row
        self._same = list(self._held)  # leading ids the actor holds as they are here

    # --- ids: kept here, edits noted for the actor ------------------------------------

    def append(self, row: int, token_id: int) -> None:
        """Main member: append the chosen token to a row."""
        self._mark(row, len(self.rows[row].ids))
        super().append(row, token_id)

    def _roll_back(self, row: int, keep: int) -> None:
        """Ids after `keep` changed (sync_text): the actor rolls its cache back there."""
        self._mark(row, keep)
        r = self.rows[row]
        r.cached = min(r.cached, keep)

    def _mark(self, row: int, keep: int) -> None:
        self._same[row] = min(self._same[row], keep)

    def _edits(self) -> list[Op]:
        """One `EditIds` per row whose ids changed since the last call."""
        edits: list[Op] = []
        for b, r in enumerate(self.rows):
            keep = self._same[b]
            if keep < len(r.ids) or keep < self._held[b]:
                edits.append(EditIds(self.batch_id, b, keep, r.ids[keep:]))
        return edits

    # --- the step ---------------------------------------------------------------------

    def forward(self, on_fed: Callable[[int, int], None] | None = None) -> None:
        """Send the queued operations and the rows' new ids; read back the logits fusion
        needs and the rows' fed positions. The actor reads long prompts in chunks of its
        own (`PREFILL_CHUNK`); `on_fed(total, total)` is called once, when the call returns.
        """
        total = sum(len(r.ids) - r.cached for r in self.rows)
        if not total:
            return  # nothing to feed (as MemberBatch): the operations wait for the next call
        self._call(self.logits_needed)
        if on_fed is not None:
            on_fed(total, total)

    def _queued(self) -> list[Op]:
        """The operations to send; a scoring batch's `Open`, not sent yet, carries the
        rows' spans (set after `__init__` queued it).
        """
        if self.score_prompts and not self._opened:
            self._opening.spans = [r.score.span for r in self._opened_rows]
        return self._ops

    def _call(self, top_k: int | None) -> None:
        """One round trip: operations, edits, forward (if anything is new), logits, and
        the rows' prompt scores for a scoring batch.
        """
        request = StepRequest(self._queued() + self._edits(), self.batch_id, top_k)
        start = time.perf_counter()
        reply = self.link.step(request)  # MemberError if the actor died or hung
        wall = time.perf_counter() - start
        self._ops, self._opened = [], True
        if reply.error is not None:
            name = self.member.name
            raise MemberError(
                name,
                f"Member {name!r} failed in its Ray actor ({reply.error}); the request was "
                f"abandoned and the ensemble stays usable. Check that {name!r} runs on its own "
                "(device, dtype, memory).",
            )
        logits = reply.member_logits(self.vocab_size)
        if isinstance(logits, TopLogits):
            self.logits, self.top = None, logits
        else:
            self.logits, self.top = logits, None
        for r, fed in zip(self.rows, reply.fed_positions):
            r.cached = len(r.ids)
            r.fed_positions = fed
        for r, (nll, size, tokens) in zip(self.rows, reply.scores or []):
            r.score.nll, r.score.bytes, r.score.tokens = nll, size, tokens
        self._held = [len(r.ids) for r in self.rows]
        self._same = list(self._held)
        self.forward_seconds += wall
        self._count(request, reply, wall)

    def _count(self, request: StepRequest, reply: StepReply, wall: float) -> None:
        stats = self.link.stats
        stats.calls += 1
        stats.row_steps += len(self.rows)
        stats.sent_bytes += request.payload_bytes()
        stats.received_bytes += reply.payload_bytes()
        stats.wall_seconds += wall
        stats.actor_seconds += reply.forward_seconds

    def require_logits(self) -> torch.Tensor:
        """The latest logits: the full (B, V) tensor, or for a helper `TopLogits`, which
        stands in for it in fusion (protocol.py).
        """
        if self.top is not None:
            return cast(torch.Tensor, self.top)  # the tensor's part fusion reads
        return super().require_logits()

    # --- rows leaving and joining -----------------------------------------------------

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), here now and in the actor next call."""
        if rows == list(range(len(self.rows))):
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.rows = [self.rows[i] for i in rows]
        self._held = [self._held[i] for i in rows]
        self._same = [self._same[i] for i in rows]
        if self.logits is not None:
            self.logits = self.logits[index]
        if self.top is not None:
            self.top = self.top[index]
        self._ops.append(KeepRows(self.batch_id, rows))

    def merge(self, other: MemberBatch) -> None:
        """Append the rows of `other` (same member, prefilled) after this batch's rows;
        they keep their prompt scores.
        """
        assert isinstance(other, RemoteMemberBatch)
        self._ops += other._queued()  # normally none: `other` was just prefilled
        self._ops.append(Merge(self.batch_id, other.batch_id))
        mixed = bool(self.rows) and (self.top is None) != (other.top is None)
        self.logits, self.top = _cat_logits(self, other)
        self.rows = self.rows + other.rows
        self._held += other._held
        self._same += other._same
        other._forget()  # its rows live on here, its cache in this batch's actor-side one
        if mixed:
            # Full logits for some rows, top-k for others (rows of fusion methods that read
            # different amounts): fetch every row's full logits, which the actor still has.
            self._call(None)

    def take_rows(self, rows: list[int]) -> list[MemberBatch]:
        """Each of these rows alone, as `MemberBatch.take_row` gives one: the actor copies
        their caches into new batches of its own in one call (`TakeRows`, sent with the
        first copy, so the reply carries that copy's logits, not the whole batch's again);
        their ids, scores and logits are copied here.
        """
        copies: list[RemoteMemberBatch] = []
        for b in rows:
            one = RemoteMemberBatch(self.member, [])
            one._ops, one._opened, one._opened_rows = [], True, []  # made by the TakeRows
            one.chunk, one.score_prompts = self.chunk, self.score_prompts
            one.rows = [copy.deepcopy(self.rows[b])]
            one._held, one._same = [self._held[b]], [self._same[b]]
            pick = torch.tensor([b], dtype=torch.long)
            one.logits = None if self.logits is None else self.logits[pick].clone()
            one.top = None if self.top is None else self.top[pick]
            copies.append(one)
        if not copies:
            return []
        # the request goes with a copy, so this batch must have nothing left to send
        assert self._opened and not self._ops and not self._edits(), "take_rows after a call"
        first = copies[0]
        first._ops = [TakeRows(self.batch_id, list(rows), [c.batch_id for c in copies])]
        try:
            first._call(self.logits_needed)  # nothing to feed: the copies are made
        except BaseException:
            for one in copies:  # an actor that made some frees them; others ignore it
                one.free()
            raise
        return list(copies)

    def free(self) -> None:
        """Drop the rows here and the cache in the actor; the batch can take new rows."""
        if self._opened:
            self.link.free(self.batch_id)
        self._forget()

    def _forget(self) -> None:
        super().free()
        self.top = None
        self._open([])


def _cat_logits(
    a: RemoteMemberBatch, b: RemoteMemberBatch
) -> tuple[torch.Tensor | None, TopLogits | None]:
    """The logits of a's rows then b's, as `merge` leaves them."""
    if not a.rows:
        return b.logits, b.top
    if a.top is not None and b.top is not None:
        return None, TopLogits.cat([a.top, b.top])
    if a.logits is not None and b.logits is not None:
        return torch.cat([a.logits, b.logits]), None
    return None, None  # kinds differ: `merge` fetches full logits for every row
