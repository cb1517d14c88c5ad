"""Speculative fused decoding across vocabularies (`GenerationConfig.speculate`; the full
account, guarantees and limits are in docs/speculative.md). One step, for all rows:

1. Draft: each speculating row's main member proposes up to k tokens alone (argmax, or a
   draw from its own sampling distribution q), one forward per token, all rows together;
   or the row's drafter, another member, drafts text greedily and the main member reads
   it, as its own tokens, in one forward (cross_drafts.py; `GenerationConfig.drafter`);
   or, for `drafter="lookup"`, the ids that followed the row's last ids where they
   occurred before are proposed and read the same way (lookup_drafts.py).
2. Verify: every helper is synced to the drafted text (`MemberBatch.plan_sync`) and reads
   it in one forward that keeps the logits after every fed position (verification.py).
3. Boundaries: a helper has read position t (after t drafted tokens) when the ids of the
   text at t are a prefix of the ids fed, their last position fed in this forward; another
   position is a gap. Position 0 is the step a plain decoder takes.
4. Fuse each row's run of positions every helper read, each row with its own fuser; mask
   as the plain step does (constrained rows do not draft).
5. Accept (acceptance.py): keep drafted tokens while they equal plain decoding's choice.
   A row kept up to a gap has its helpers re-synced to the text there (rolled back to
   the ids that text gives and fed them, the rows together in one more forward) and goes
   on from 4 with its next run; the rest of its draft was read already.
6. Apply the kept tokens as the plain step would; roll every member back to them; adapt
   each row's draft length to its acceptance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from ..members import Member
from ..members.output_layer import ShortlistHead
from ..outputs import StreamEvent
from ..remote.batch import new_batch
from .acceptance import accept_draft
from .cache_ops import common_prefix
from .constraints import apply_masks
from .cross_drafts import HelperDraft, cross_draft, drafter_position
from .drafts import Draft, row_sampler
from .lookup_drafts import lookup_proposals
from .main_drafts import draft_own, draft_shortlist
from .member_batch import MemberBatch
from .row_scores import fuse_rows
from .rows import DecodeHooks, Row, note_logprob
from .sampling import suppress_end_tokens
from .verification import HelperReads, read_drafts, resync


class Decoder(Protocol):
    """What a speculative step uses of the decoding loop (`loop.BatchDecoder`)."""

    rows: list[Row]
    batches: list[MemberBatch]
    members: list[Member]
    member_index: list[int]
    main: int
    main_member: Member
    hooks: DecodeHooks

    def _finish(self, b: int, reason: str) -> Iterator[StreamEvent]: ...

    def _keep(self, keep: list[int]) -> None: ...


class Speculator:
    """Speculative steps of a `BatchDecoder` (see the module docstring)."""

    def __init__(self, decoder: Decoder, max_rows: int = 0, precision: str = "auto") -> None:
        self.dec = decoder
        self.max_rows = max_rows  # more rows than this (0: no limit): standard steps
        self.precision = precision  # of the main member's drafts (`_draft_heads`)
        self.length: dict[int, int] = {}  # id(row) -> its current draft length
        self.helper_drafts: dict[int, HelperDraft] = {}  # this step's drafting helpers
        self.sizes: list[int] | None = None  # the members' parameter counts, once needed
        self.reads: list[HelperReads | None] = []  # each helper's reading of this step's drafts

    def wanted(self) -> bool:
        """Whether some row would draft this step (else the plain step runs)."""
        return any(self._draft_length(b) > 0 for b in range(len(self.dec.rows)))

    def helpers_wait(self) -> bool:
        """Whether the helpers' next ids may wait for the next step's verification forward
        (one forward fewer per step): true when that step will be speculative.
        """
        return self.wanted()

    def main_head(self) -> tuple[ShortlistHead | None, torch.nn.Module | None]:
        """The output rows the main member's forward before the next step may stop at, and
        the body it may run: its draft shortlist and draft body (`_draft_heads`) when that
        step is speculative and every drafting row drafts with the main member, which then
        drafts its first token from them too; the exact logits follow with the drafts'
        (main_drafts.py), or at the next `require_logits`.
        """
        dec = self.dec
        lengths = [self._draft_length(b) for b in range(len(dec.rows))]
        if not any(lengths) or any(
            n and self._drafter(b) != dec.main for b, n in enumerate(lengths)
        ):
            return None, None
        return self._draft_heads()

    def _draft_heads(self) -> tuple[ShortlistHead | None, torch.nn.Module | None]:
        """The main member's draft shortlist and the body its drafts run: in bfloat16 per
        `SchedulerConfig.draft_precision` (members/draft_body.py), else None: its own body,
        a float32 shortlist.
        """
        dec = self.dec
        layer = dec.main_member.output_layer
        body = None if layer is None else layer.draft_body(self.precision)
        dtype = None if body is None else torch.bfloat16
        return draft_shortlist(dec.members, dec.main, dtype), body

    @contextmanager
    def shortlisted(self, wait: bool) -> Iterator[None]:
        """The main member's forwards inside stop at `main_head` when `wait` (the next step
        is speculative), else read the full layer.
        """
        main = self.dec.batches[self.dec.main]
        with main.heads(*(self.main_head() if wait else (None, None))):
            yield

    def catch_up(self) -> None:
        """Feed helpers' ids left waiting (a plain step follows a speculative one)."""
        for i, batch in enumerate(self.dec.batches):
            if i != self.dec.main and any(r.cached < len(r.ids) for r in batch.rows):
                batch.forward()

    def _draft_length(self, b: int) -> int:
        """Row b's draft length now: its adaptive length, 0 where speculation is off (one
        member run, a constraint, measuring hooks, more rows than `max_rows`), short of
        max_new_tokens and windows.
        """
        dec, row = self.dec, self.dec.rows[b]
        k = row.config.speculate
        plain_hooks = dec.hooks.on_step is None and dec.hooks.helper_batch is new_batch
        off = row.constraint is not None or len(dec.members) == 1 or not plain_hooks
        crowded = self.max_rows and len(dec.rows) > self.max_rows
        if not k or off or crowded:
            return 0
        k = min(self.length.setdefault(id(row), k), row.config.max_new_tokens - row.generated - 1)
        window = dec.main_member.context_window
        if window is not None:
            k = min(k, window - len(dec.batches[dec.main].rows[b].ids))
        return max(k, 0)

    def step(self) -> list[tuple[Row, StreamEvent]]:
        """One speculative step for every row; the events it makes final (as
        `BatchDecoder.step`).
        """
        dec, t0 = self.dec, time.perf_counter()
        forward0 = [batch.forward_seconds for batch in dec.batches]
        lengths = [self._draft_length(b) for b in range(len(dec.rows))]
        # 1. draft with the main member alone.
        drafts = self._draft(lengths)
        # 2.-3. helpers read the drafts in one forward; which positions they verify.
        self._read(drafts)
        # 4.-5. fuse and accept every verifiable position, re-syncing helpers at gaps.
        verdicts = self._verify(drafts)
        # 6. apply, roll back, finish.
        events: list[tuple[Row, StreamEvent]] = []
        finished: dict[int, str] = {}
        for b, row in enumerate(dec.rows):
            kept, fused = verdicts[b]
            reason = self._apply(b, row, drafts[b], kept, fused)
            self._adapt(row, drafts[b], kept, lengths[b])
            if reason is not None:
                finished[b] = reason
        spent = time.perf_counter() - t0
        for batch, start in zip(dec.batches, forward0):
            forwards = batch.forward_seconds - start
            spent -= forwards
            for row in dec.rows:
                seconds = row.usage.forward_seconds
                seconds[batch.member.name] = seconds.get(batch.member.name, 0.0) + forwards
        for b, row in enumerate(dec.rows):
            row.usage.fusion_seconds += spent
            if b in finished:
                events.extend((row, e) for e in dec._finish(b, finished[b]))
            elif delta := row.text.delta():
                event = StreamEvent(delta=delta, index=row.index, logprobs=row.take_logprobs())
                events.append((row, event))
        dec._keep([b for b in range(len(dec.rows)) if b not in finished])
        live = {id(row) for row in dec.rows}
        self.length = {key: k for key, k in self.length.items() if key in live}
        return events

    # --- 1. draft ------------------------------------------------------------------------

    def _drafter(self, b: int) -> int:
        """Row b's drafter, as a position among the members run (`dec.main`: the main)."""
        dec = self.dec
        if self.sizes is None:  # parameter counts, for drafter="auto"
            self.sizes = [m.num_parameters for m in dec.members]
        return drafter_position(dec.rows[b].config.drafter, self.sizes, dec.member_index, dec.main)

    def _draft(self, lengths: list[int]) -> list[Draft]:
        """Each row's draft: up to `lengths[b]` main-member tokens, drafted by a helper
        (cross_drafts.py) or by the main member, one forward per token.
        """
        dec = self.dec
        main = dec.batches[dec.main]
        drafters = [self._drafter(b) if n else dec.main for b, n in enumerate(lengths)]
        # shortlisted where `main_head` let the last forward stop there: drafted from, then
        # completed by draft_own; a helper's draft needs the full logits first
        everyone = all(n == 0 or drafters[b] == dec.main for b, n in enumerate(lengths))
        logits = main.shortlisted_logits() if everyone else main.require_logits()  # (B, V)
        drafts = [Draft(main_logits=[logits[b]]) for b in range(len(dec.rows))]
        proposals = lookup_proposals(main, lengths, drafters)
        for b in [b for b, ids in proposals.items() if not ids]:
            drafters[b] = dec.main  # nothing to look up: the main member drafts instead
            del proposals[b]
        self.helper_drafts = cross_draft(
            dec.batches, dec.main, dec.rows, drafts, lengths, drafters, proposals
        )
        own = [n if drafters[b] == dec.main else 0 for b, n in enumerate(lengths)]
        if any(own):
            draft_own(main, dec.rows, drafts, own, *self._draft_heads())
        texts = dec.main_member.vocab.texts
        for b, row in enumerate(dec.rows):
            d = drafts[b]
            pieces = [texts[t] or b"" for t in d.tokens[: d.fed]]
            d.texts = [row.text.text, *row.text.preview(pieces)]
        return drafts

    # --- 2.-3. verification forwards -----------------------------------------------------

    def _read(self, drafts: list[Draft]) -> None:
        """Every helper reads every row's draft in one forward (verification.py); rows are
        cut to the positions each helper's window holds.
        """
        dec = self.dec
        for d in drafts:
            d.positions = d.fed + 1
        self.reads = [
            None if i == dec.main else read_drafts(batch, drafts, self.helper_drafts.get(i))
            for i, batch in enumerate(dec.batches)
        ]

    def _reach(self, b: int, d: Draft, start: int) -> int:
        """The end of row b's run of positions every helper has read, from `start`."""
        t = start
        while t < d.positions and all(r is None or r.logits[b][t] is not None for r in self.reads):
            t += 1
        return t

    def _verify(self, drafts: list[Draft]) -> list[tuple[list[int], torch.Tensor]]:
        """Each row's kept tokens and its fused (P, V_main) logits at the positions they
        were chosen at: runs of positions every helper read are fused and accepted; a row
        whose draft is kept up to a gap has its helpers re-synced there (verification.py)
        and goes on, until its draft ends or a drafted token is not kept.
        """
        dec = self.dec
        start = [0] * len(drafts)
        end = [self._reach(b, d, 0) for b, d in enumerate(drafts)]
        kept: list[list[int]] = [[] for _ in drafts]
        parts: list[list[torch.Tensor]] = [[] for _ in drafts]
        active = list(range(len(drafts)))
        while active:
            owners = [(b, t) for b in active for t in range(start[b], end[b])]
            fused = self._fuse(owners, drafts)
            at, going = 0, []
            for b in active:
                row, d, s, n = dec.rows[b], drafts[b], start[b], end[b] - start[b]
                sampler, mine = row_sampler(row), fused[at : at + n]
                at += n
                numbers = (
                    []
                    if sampler.greedy
                    else [row.uniform(row.generated + t) for t in range(s, end[b])]
                )
                more = accept_draft(sampler, mine, d.tokens[s:], numbers)
                kept[b] += more
                parts[b].append(mine)
                if end[b] < d.positions and more == d.tokens[s : end[b]]:
                    going.append(b)  # kept up to a gap: re-sync there and go on
            for reads in self.reads:
                if reads is not None:
                    resync(reads, {b: end[b] for b in going})
            for b in going:
                dec.rows[b].usage.resyncs += 1
                start[b], end[b] = end[b], self._reach(b, drafts[b], end[b])
            active = going
        return [(k, torch.cat(p)) for k, p in zip(kept, parts)]

    # --- 4. fuse --------------------------------------------------------------------------

    def _fuse(self, owners: list[tuple[int, int]], drafts: list[Draft]) -> torch.Tensor:
        """Fused (N, V_main) logits at `owners` (row b's position t, after t drafted
        tokens), masked as the plain step masks them.
        """
        dec = self.dec
        stacked = []
        for reads in self.reads:
            if reads is None:  # the main member
                parts = [drafts[b].main_logits[t] for b, t in owners]
            else:
                parts = [reads.logits[b][t] for b, t in owners]  # type: ignore[misc]
            stacked.append(torch.stack(parts))  # (N, V_i)
        groups: dict[int, list[int]] = {}
        for p, (b, _) in enumerate(owners):
            groups.setdefault(id(dec.rows[b].fuser), []).append(p)
        # each position fused with its row's weights (`weighting="prompt"`: per row)
        if len(groups) == 1:
            fused = fuse_rows([dec.rows[b] for b, _ in owners], stacked)
        else:
            device = stacked[dec.main].device
            fused = torch.empty(stacked[dec.main].shape, dtype=torch.float32, device=device)
            for positions in groups.values():
                index = torch.tensor(positions)
                part = fuse_rows(
                    [dec.rows[owners[p][0]] for p in positions],
                    [x[index.to(x.device)] for x in stacked],
                )
                fused[index.to(device)] = part.to(device)
        rows = dec.rows
        fused = apply_masks(fused, [rows[b].constraint if t == 0 else None for b, t in owners])
        early = [rows[b].generated + t < rows[b].config.min_new_tokens for b, t in owners]
        eos = torch.tensor(sorted(dec.main_member.eos_ids), dtype=torch.long, device=fused.device)
        return suppress_end_tokens(fused, eos, torch.tensor(early, device=fused.device))

    # --- 6. apply -------------------------------------------------------------------------

    def _apply(
        self, b: int, row: Row, d: Draft, kept: list[int], fused: torch.Tensor
    ) -> str | None:
        """Take the kept tokens as the plain step would and roll every member back to
        them; the row's finish reason, or None while it runs on.
        """
        dec = self.dec
        member = dec.main_member
        texts, eos = member.vocab.texts, member.eos_ids
        reason: str | None = None
        appended: list[int] = []
        for t, token in enumerate(kept):
            if row.config.logprobs is not None:
                note_logprob(row, torch.log_softmax(fused[t].float(), -1), token, texts, eos)
            row.generated += 1
            row.usage.completion_tokens += 1
            if token in eos:
                reason = "eos"
                break
            appended.append(token)
            row.text.add(texts[token] or b"")
            if row.constraint is not None:
                row.constraint.advance(token)
            if row.text.stopped:
                reason = "stop"
            elif row.constraint is not None and row.constraint.finished:
                reason = "eos"
            elif row.generated >= row.config.max_new_tokens:
                reason = "length"
            if reason is not None:
                break
        # the main member: its ids before the draft, then the appended tokens
        main = dec.batches[dec.main]
        start = len(main.rows[b].ids) - d.fed
        same = common_prefix(d.tokens[: d.fed], appended)
        main.replace_ids(b, start + same, appended[same:])
        if same == len(appended) and main.logits is not None:
            main.logits[b] = d.main_logits[same]  # logits after its last kept draft
        if reason is not None:
            return reason
        # helpers: re-sync from their ids before the draft to the row's text
        for i, batch in enumerate(dec.batches):
            if i != dec.main:
                before = self.reads[i].before[b]  # type: ignore[union-attr]
                batch.apply_plan(b, batch.plan_sync(before, row.text.text))
            if not batch.fits(b):
                return "length"
        return None

    def _adapt(self, row: Row, d: Draft, kept: list[int], length: int) -> None:
        """Next draft length: one longer after a fully kept draft, else the kept length
        plus one (at least 1), within the row's `speculate`.
        """
        if not length:
            return
        accepted = common_prefix(d.tokens, kept)
        row.usage.drafted_tokens += len(d.tokens)
        row.usage.accepted_tokens += accepted
        row.usage.drafts += 1
        grow = accepted >= len(d.tokens)
        nxt = length + 1 if grow else max(1, accepted + 1)
        self.length[id(row)] = min(row.config.speculate or 0, nxt)
