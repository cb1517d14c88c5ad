"""`main="auto"`: each row is led by the member that reads its prompt best.

The leading member writes the row (DeePEn's output vocabulary, the chat reply's format),
so it must be fixed before the row's first step, and the decoding loop runs one leader per
batch (`BatchDecoder`: all rows share one main member). The scheduler therefore decides a
row's leader before the row joins a batch:

1. `score_rows`: every member prefills the rows' prompts once, scoring them
   (decoding/prompt_scores.py: bits per UTF-8 byte of the member's own tokens), then frees
   that cache; a member in a Ray actor prefills and scores in its actor (remote/batch.py).
   This is one prefill more than a fixed leader costs: the row's batch prefills its prompt
   again when it joins (reusing this cache is future work).
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

from collections.abc import Sequence

from ..fusion import Fuser
from ..fusion.weights import lowest_score
from ..members import Member
from ..remote.batch import new_batch
from .member_batch import PREFILL_CHUNK
from .prompts import fit_context
from .rows import NewRow


def score_rows(
    members: Sequence[Member], rows: Sequence[NewRow], chunk: int = PREFILL_CHUNK
) -> list[list[float | None]]:
    """[row][member] bits per byte of each row's prompt (a prefill per member, freed)."""
    scores: list[list[float | None]] = [[] for _ in rows]
    for i, member in enumerate(members):
        ids = []
        for row in rows:
            text, special = row.prompts[i]
            tokens = member.tokenizer(text, add_special_tokens=special).input_ids
            ids.append(fit_context(tokens, text, member, row.index, row.config))
        batch = new_batch(member, ids)  # in this process or in the member's actor
        batch.chunk = chunk
        batch.score_prompts = True
        for row_ids, row in zip(batch.rows, rows):
            row_ids.score.span = row.fuser.config.prompt_score
        try:
            batch.forward()
            for b, r in enumerate(batch.rows):
                scores[b].append(r.score.bits_per_byte)
        finally:
            batch.free()
    return scores


def chat_capable(members: Sequence[Member]) -> list[int]:
    """Members with a chat template of their own (all of them if none has one)."""
    capable = [
        i
        for i, m in enumerate(members)
        if m.chat_template or getattr(m.tokenizer, "chat_template", None)
    ]
    return capable or list(range(len(members)))


def assign_leaders(
    members: Sequence[Member], rows: list[NewRow], chunk: int = PREFILL_CHUNK
) -> list[NewRow]:
    """The rows, each with the fuser of its leader, ordered by leader (see the module
    docstring). Every row's fuser must have `main="auto"`.
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
        scores = score_rows(members, [rows[b] for b in open_rows], chunk)
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
