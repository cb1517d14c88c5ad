"""`main="auto"`: each row is led by the member that reads its prompt best.

The leading member writes the row (DeePEn's output vocabulary, the chat reply's format),
so it must be fixed before the row's first step, and the decoding loop runs one leader per
batch (`BatchDecoder`: all rows share one main member). The scheduler therefore decides a
row's leader before the row joins a batch:

1. `score_rows`: every member prefills the rows' prompts once, scoring them
   (decoding/prompt_scores.py: bits per UTF-8 byte of the member's own tokens); a member
   in a Ray actor prefills and scores in its actor (remote/batch.py). Up to `keep` rows
   (the scheduler's free room) keep that prefill, one batch per member and row
   (`NewRow.prefill`): the row's decoder adopts those caches when it joins (`adopt`), so
   choosing the leader costs no second prefill. A request of one row keeps its scoring
   batches themselves, a member's in a Ray actor included (the actor keeps the cache, the
   decoder merges that batch into its own); of several rows, each kept row's caches are
   copied out (`MemberBatch.take_rows`; an actor copies all of a batch's rows in one call,
   `RemoteMemberBatch.take_rows`). A row keeps its prefill while it waits (say for the
   running batch of another leader to drain; the scheduler counts it against
   `max_batch_size`). The other rows' caches (rows beyond the room) are freed, and those
   rows are prefilled again when they join: one prefill more than a fixed leader costs.
2. `lowest_score`: the row's leader is the member with the lowest bits per byte; a chat row
   chooses among the members with a chat template (a base model does not follow a
   conversation), any member if none has one. A prompt too short to score (one text
   token) keeps the first allowed member. A row with one allowed member (a chat row when
   one member has a template, as the default pair) is not scored here at all.
3. `assign_leaders`: the row's fuser becomes the ensemble's settings with that `main`
   (one fuser per leader, shared by the request's rows), and the rows are ordered by
   leader (events carry each row's prompt position, so order does not show), so the
   scheduler admits each leader's rows into a batch of that leader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ..fusion import Fuser
from ..fusion.weights import lowest_score
from ..members import Member
from ..remote.batch import RemoteMemberBatch, new_batch
from .member_batch import PREFILL_CHUNK, MemberBatch
from .prompts import fit_context
from .rows import NewRow, Prepared

OnRead = Callable[[Member, int, int], None]
"""Told (member, positions read, positions in all) after each pass of a scoring prefill."""


def score_rows(
    members: Sequence[Member],
    rows: Sequence[NewRow],
    chunk: int = PREFILL_CHUNK,
    keep: int = 0,
    on_read: OnRead | None = None,
) -> list[list[float | None]]:
    """[row][member] bits per byte of each row's prompt (a prefill per member, freed; the
    first `keep` rows keep theirs as `NewRow.prefill`).
    """
    keep = max(0, keep)
    held = keep > 0 and len(rows) == 1  # a lone row keeps its batches themselves
    scores: list[list[float | None]] = [[] for _ in rows]
    kept: list[list[MemberBatch]] = [[] for _ in rows[:keep]]  # [row][member]
    batches: list[MemberBatch] = []
    try:
        for i, member in enumerate(members):
            ids = []
            for row in rows:
                text, special = row.prompts[i]
                tokens = member.tokenizer(text, add_special_tokens=special).input_ids
                ids.append(fit_context(tokens, text, member, row.index, row.config))
            batch = new_batch(member, ids)  # in this process or in the member's actor
            batches.append(batch)
            batch.chunk = chunk
            batch.score_prompts = True
            for row_ids, row in zip(batch.rows, rows):
                row_ids.score.span = row.fuser.config.prompt_score
        _read(batches, on_read)
        for batch in batches:
            for b, r in enumerate(batch.rows):
                scores[b].append(r.score.bits_per_byte)
            if held:
                kept[0].append(batch)
            else:
                for taken, one in zip(kept, batch.take_rows(list(range(len(kept))))):
                    taken.append(one)  # the first `keep` rows, copied out
    except BaseException:
        if not held:
            for copy in (c for row_batches in kept for c in row_batches):
                copy.free()
        held = False  # every batch made is freed below
        raise
    finally:
        if not held:
            for batch in batches:
                batch.free()
    for row, row_batches in zip(rows, kept):
        row.prefill = row_batches
    return scores


def _read(batches: Sequence[MemberBatch], on_read: OnRead | None) -> None:
    """Every member's scoring prefill. Members in Ray actors read at the same time as the
    others, each from a thread of its own that only waits for its actor (as the decoding
    loop feeds them); members in this process read here, one after another.
    """
    feeds = [
        (batch, partial(batch.forward, None if on_read is None else partial(on_read, batch.member)))
        for batch in batches
    ]
    remote = [feed for batch, feed in feeds if batch.member.remote is not None]
    if len(feeds) < 2 or not remote:
        for _, feed in feeds:
            feed()
        return
    with ThreadPoolExecutor(max_workers=len(remote)) as pool:  # waits for them on exit
        futures = [pool.submit(feed) for feed in remote]
        for batch, feed in feeds:
            if batch.member.remote is None:
                feed()
        for future in futures:
            future.result()  # the first actor's error, if any


def chat_capable(members: Sequence[Member]) -> list[int]:
    """Members with a chat template of their own (all of them if none has one)."""
    capable = [
        i
        for i, m in enumerate(members)
        if m.chat_template or getattr(m.tokenizer, "chat_template", None)
    ]
    return capable or list(range(len(members)))


def assign_leaders(
    members: Sequence[Member],
    rows: list[NewRow],
    chunk: int = PREFILL_CHUNK,
    keep: int = 0,
    on_read: OnRead | None = None,
) -> list[NewRow]:
    """The rows, each with the fuser of its leader, ordered by leader (see the module
    docstring); up to `keep` of them keep their scoring prefill, whose progress goes to
    `on_read`. Every row's fuser must have `main="auto"`.
    """
    if not rows:
        return rows
    chat = chat_capable(members)
    # a row with one possible leader (one member, or a chat row and one chat member)
    # needs no scoring prefill: its prefill scores it if its weights need the scores
    allowed = [list(range(len(members))) if row.prompts[0][1] else chat for row in rows]
    leaders = [a[0] for a in allowed]
    open_rows = [b for b, a in enumerate(allowed) if len(a) > 1]
    if open_rows:
        scores = score_rows(members, [rows[b] for b in open_rows], chunk, keep, on_read)
        for b, row_scores in zip(open_rows, scores):
            best = lowest_score(row_scores, allowed[b])
            leaders[b] = allowed[b][0] if best is None else best
            rows[b].prompt_scores = dict(enumerate(row_scores))  # reported with the result
    fusers: dict[tuple[int, int], Fuser] = {}
    for row, leader in zip(rows, leaders):
        key = (id(row.fuser), leader)
        if key not in fusers:
            config = row.fuser.config.model_copy(update={"main": leader})
            fusers[key] = row.fuser.with_config(config)
            # the leader's fuser counts into the caller's stats (gated rows, seconds)
            fusers[key].stats = row.fuser.stats
        row.fuser = fusers[key]
    order = sorted(range(len(rows)), key=lambda b: leaders[b])
    return [rows[b] for b in order]


def adopt(
    prepared: Prepared,
    members_run: Sequence[int],
    helper_batch: Callable[..., MemberBatch],
    chunk: int,
) -> tuple[Prepared, list[MemberBatch], Prepared]:
    """Split prepared rows into those a decoder adopts prefilled (`NewRow.prefill`), with
    one batch per member it runs (`members_run`, ensemble indices) holding their caches,
    and the rest. Adopted: every member run read (here or in its Ray actor) the ids the
    row would be fed now, nothing is to be resumed, and helpers' batches are the plain
    ones. Prefilled batches not adopted (members not run, rows that do not qualify) are
    freed.
    """
    plain = helper_batch is new_batch and prepared.prefill
    adopted = [
        b
        for b, batches in enumerate(prepared.prefill if plain else [])
        if batches is not None
        and not prepared.resume[b]
        and all(
            type(batches[i]) in (MemberBatch, RemoteMemberBatch)
            and batches[i].rows[0].ids == prepared.ids[k][b]
            for k, i in enumerate(members_run)
        )
    ]
    for b, batches in enumerate(prepared.prefill):
        for i, batch in enumerate(batches or []):
            if b not in adopted or i not in members_run:
                batch.free()
    part = prepared.subset(adopted)
    fresh = []
    for i in members_run if adopted else []:
        batches = [p[i] for p in part.prefill if p is not None]
        for more in batches[1:]:
            batches[0].merge(more)
        batches[0].chunk = chunk
        fresh.append(batches[0])
    rest = prepared.subset([b for b in range(len(prepared.rows)) if b not in adopted])
    return part, fresh, rest
