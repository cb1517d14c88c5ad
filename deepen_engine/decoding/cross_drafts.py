"""Drafting with a member other than the main one (`GenerationConfig.drafter`) for
speculative decoding (speculative.py), so that the cheapest member pays for the drafts.

1. Choose: each row's drafter is the main member (`"main"`), a member index, or, for
   `"auto"`, the member with the fewest parameters (output layer included: the forward
   that reads the fewest weights), ties to the lower index.
2. Draft: the drafter proposes text greedily from its own logits, one forward per token
   for all its rows together; the last drafted token is not fed (nothing reads the logits
   after it). A draft stops at an end token or a token without text. The drafter's batch
   keeps the logits of every position it feeds in this step, so the verification reads
   the positions the draft already fed instead of feeding them again.
3. Convert: the drafted bytes are tokenised by the main member. Kept are the leading ids
   that the draft without its last drafted token tokenises to as well (later text cannot
   merge into them) and whose bytes are the draft's own; a draft that ended on an end
   token keeps all of them. Exactness needs no drafter distribution: acceptance.py keeps
   proposed tokens while they equal plain decoding's choice.
4. Feed: the main member reads every row's proposal in one forward that keeps every fed
   position's logits; they are its distributions at the verified positions.

Roll-back needs nothing new: the drafter is a helper, so its ids before the draft are
kept (`HelperDraft.before`) and the step re-syncs it to the kept text like every helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..members import Member
from ..reductions import argmax
from .cache_ops import common_prefix
from .drafts import Draft, copy_ids, fed_logits, forward_keeping
from .lookup_drafts import LOOKUP
from .member_batch import MemberBatch
from .row_ids import RowIds
from .rows import Row


@dataclass
class HelperDraft:
    """What the verification needs of a drafting helper's batch."""

    before: list[RowIds]  # each row's ids before the draft
    start: torch.Tensor  # (B, V_i) logits after each row's ids before the draft


def drafter_position(choice: int | str, sizes: Sequence[int], index: list[int], main: int) -> int:
    """The position among the members run (`index`: their ensemble indices, `sizes`: their
    parameter counts) of the member that drafts for a row with `GenerationConfig.drafter` =
    `choice`; `main` when the main member drafts (also for a member that is not run),
    `LOOKUP` for prompt lookup (lookup_drafts.py).
    """
    if choice == "main":
        return main
    if choice == "lookup":
        return LOOKUP
    if choice == "auto":
        return min(range(len(sizes)), key=lambda p: (sizes[p], index[p]))
    return index.index(choice) if choice in index else main


def draft_text(
    batch: MemberBatch, lengths: dict[int, int]
) -> tuple[HelperDraft, dict[int, tuple[list[bytes], bool]]]:
    """Step 2 for one drafting helper: up to `lengths[b]` tokens for each of its rows b;
    per row the drafted tokens' bytes and whether the draft ended on an end token. The
    batch keeps fed logits on until the verification has read them.
    """
    if any(r.cached < len(r.ids) for r in batch.rows):
        batch.forward()  # ids left for this step's verification forward: fed now
    state = HelperDraft([copy_ids(r) for r in batch.rows], batch.require_logits())
    batch.keep_fed_logits, batch.fed_logits = True, [[] for _ in batch.rows]
    texts, eos = batch.member.vocab.texts, batch.member.eos_ids
    pieces: dict[int, list[bytes]] = {b: [] for b in lengths}
    stopped: set[int] = set()  # rows whose draft met an end token or a token without text
    ended: set[int] = set()  # of those, an end token
    logits = state.start  # (B, V_i)
    for r in range(max(lengths.values(), default=0)):
        feeding = False
        for b, n in lengths.items():
            if r >= n or b in stopped:
                continue
            token = int(argmax(logits[b : b + 1])[0])
            piece = texts[token]
            if token in eos or not piece:
                stopped.add(b)
                if token in eos:
                    ended.add(b)
                continue
            pieces[b].append(piece)
            if r + 1 < n:  # the logits after a row's last drafted token are never read
                batch.append(b, token)
                feeding = True
        if not feeding:
            break
        batch.forward()
        logits = batch.require_logits()
    return state, {b: (pieces[b], b in ended) for b in lengths}


def main_ids(member: Member, pieces: list[bytes], ended: bool, limit: int) -> list[int]:
    """Step 3: the main member's ids proposed for a draft's pieces, at most `limit`."""
    data = b"".join(pieces)
    ids = _encode(member, data)
    if not ended and pieces:
        ids = ids[: common_prefix(ids, _encode(member, data[: len(data) - len(pieces[-1])]))]
    texts, out, at = member.vocab.texts, [], 0
    for token in ids[:limit]:  # only ids that stand for the draft's own bytes
        piece = texts[token]
        if not piece or data[at : at + len(piece)] != piece:
            break
        out.append(token)
        at += len(piece)
    return out


def _encode(member: Member, data: bytes) -> list[int]:
    """The member's ids of the longest valid UTF-8 prefix of `data`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # an incomplete or invalid character: cut there
        text = data[: exc.start].decode("utf-8")
    if not text:
        return []
    ids: list[int] = member.tokenizer(text, add_special_tokens=False).input_ids
    return ids


def feed_proposals(
    main: MemberBatch, proposals: dict[int, list[int]]
) -> dict[int, list[torch.Tensor]]:
    """Step 4: append each row's proposal to the main member and read them all in one
    forward; per row the (V,) logits after each proposed token.
    """
    starts = {b: len(main.rows[b].ids) for b in proposals}
    for b, ids in proposals.items():
        for token in ids:
            main.append(b, token)
    main.fed_logits = [[] for _ in main.rows]
    try:
        forward_keeping(main)
        out: dict[int, list[torch.Tensor]] = {}
        for b, ids in proposals.items():
            found = [fed_logits(main, b, starts[b] + t) for t in range(len(ids))]
            out[b] = [x for x in found if x is not None]
            assert len(out[b]) == len(ids)  # every proposed position was fed just now
    finally:
        main.fed_logits = []
    return out


def cross_draft(
    batches: list[MemberBatch],
    main: int,
    rows: list[Row],
    drafts: list[Draft],
    lengths: list[int],
    drafters: list[int],
    proposals: dict[int, list[int]],
) -> dict[int, HelperDraft]:
    """Steps 2-4 for the rows whose drafter (`drafters[b]`, a position in `batches`) is
    not the main member: fill their drafts with the proposal and the main member's logits
    after each proposed token; the state of each drafting helper, by position. A row whose
    text holds back part of a character does not draft (the helper's text and the main
    member's ids differ there). `proposals` holds the rows drafted without a model already
    (lookup_drafts.py); the main member reads every proposal in the same forward.
    """
    states: dict[int, HelperDraft] = {}
    main_member = batches[main].member
    for i in sorted(set(drafters) - {main, LOOKUP}):
        batch = batches[i]
        window = batch.member.context_window
        wanted: dict[int, int] = {}
        for b, drafter in enumerate(drafters):
            if drafter != i or rows[b].text.held:
                continue
            n = lengths[b] + 1  # one more: the last drafted token's ids are seldom stable
            if window is not None:  # the draft feeds n - 1 tokens
                n = min(n, window - len(batch.rows[b].ids) + 1)
            if n > 0:
                wanted[b] = n
        if not wanted:
            continue
        states[i], texts = draft_text(batch, wanted)
        for b, (pieces, ended) in texts.items():
            proposals[b] = main_ids(main_member, pieces, ended, lengths[b])
    if any(proposals.values()):
        for b, found in feed_proposals(batches[main], proposals).items():
            drafts[b].tokens = list(proposals[b])
            drafts[b].main_logits.extend(found)
    return states
