"""The main member drafting its own tokens (speculative.py, step 1): one forward per drafted
token, all drafting rows together, each token its argmax or a draw from its sampling
distribution q.

Shortlist drafting: where the main member's output layer is applied by the engine
(members/output_layer.py) and is large, the drafts read only its rows for the tokens
every other member can also write (their texts shared), plus its special and byte tokens
(`draft_shortlist`); Gemma-3-270m's 262,144 rows become about 53,000 on the default pair.
Each draft forward then costs its body and a fifth of the output layer. The drafts are
still the main member's own proposals (the shortlisted tokens' logits are exactly the full
layer's), and the full layer runs once, after the last draft, over the hidden states of
every drafted position: those full logits are what verification fuses. So the output is
unchanged (greedy text identical; sampled rows accept against q, the shortlisted
distribution a draft was drawn from); a draft whose best token lies outside the shortlist
is only rejected, at the cost of that draft's remaining positions.

Drafting in bfloat16 (`SchedulerConfig.draft_precision`, members/draft_body.py): the draft
forwards (the loop's `advance` before the step too) run the member's body with bfloat16
linear layers and a bfloat16 shortlist, and the last drafted token is not fed. Then one
float32 forward feeds every position the draft body fed again (the cache is rolled back
there first) together with that last token, keeping every position's logits: the exact
logits verification fuses, from one pass of the body and the full layer over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..members import Member
from ..members.output_layer import ShortlistHead
from ..reductions import argmax
from .drafts import Draft, fed_logits, forward_keeping, row_sampler
from .member_batch import MemberBatch
from .rows import Row
from .sampling import suppress_end_tokens

# Shortlist drafting pays only where it drops most of the output layer
_MOST_ROWS = 0.5


def draft_shortlist(
    members: Sequence[Member], main: int, dtype: torch.dtype | None = None
) -> ShortlistHead | None:
    """The main member's draft shortlist (module docstring), its weights in `dtype` where
    given, built once per set of other members and dtype; None where it has no engine
    output layer or the shortlist keeps more than half of it (in another dtype than the
    layer's, the whole layer in that dtype then).
    """
    member = members[main]
    layer = member.output_layer
    if layer is None:
        return None
    key = (tuple(m.name for i, m in enumerate(members) if i != main), dtype or layer.weight.dtype)
    if key in layer.shortlists:
        return layer.shortlists[key]
    others = [
        {t for t in m.vocab.texts if t is not None} for i, m in enumerate(members) if i != main
    ]
    keep = [
        i for i, t in enumerate(member.vocab.texts) if t is not None and all(t in o for o in others)
    ]
    rows = set(keep) | set(member.vocab.byte_fallback_ids) | set(member.eos_ids)
    size = len(member.vocab)
    rows |= {int(i) for i in member.tokenizer.added_tokens_decoder if int(i) < size}
    head = None
    if len(rows) <= _MOST_ROWS * size:
        head = layer.shortlist(torch.tensor(sorted(rows), dtype=torch.long), dtype)
    elif dtype is not None and dtype != layer.weight.dtype:  # every row, in the drafts' dtype
        head = layer.shortlist(torch.arange(size), dtype)
    layer.shortlists[key] = head
    return head


def draft_own(
    main: MemberBatch,
    rows: list[Row],
    drafts: list[Draft],
    lengths: list[int],
    shortlist: ShortlistHead | None,
    body: torch.nn.Module | None = None,
) -> None:
    """Row b drafts up to `lengths[b]` tokens with the main member (`main`), appended to
    `drafts[b]`; over `shortlist` where given, then the full logits of every drafted
    position (and of position 0 where the last forward was shortlisted already: the loop's
    `advance` feeds the main member that way before a speculative step) from one pass of the
    full output layer. With `body` (a draft body, members/draft_body.py) the draft forwards
    run it, the last drafted token is not fed, and `_exact_logits` reads every drafted
    position's logits from one exact forward instead.
    """
    member = main.member
    eos_ids = member.eos_ids
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    # (row, index in its draft's main_logits, (d,) hidden state) where the full layer is owed
    owed = [(b, 0, r.owed) for b, r in enumerate(main.rows) if r.owed is not None]
    # each row's index of its first drafted id (another drafter's rows hold theirs already)
    starts = [len(r.ids) - d.fed for r, d in zip(main.rows, drafts)]
    with main.heads(shortlist, body):
        for r in range(max(lengths, default=0)):
            fed = False
            for b, row in enumerate(rows):
                d = drafts[b]
                if r >= lengths[b] or len(d.tokens) != r or d.fed < r:
                    continue  # done: its length reached, or it drafted an end token
                scores = d.main_logits[-1][None]  # (1, V)
                early = torch.tensor([row.generated + r < row.config.min_new_tokens])
                scores = suppress_end_tokens(scores, eos.to(scores.device), early.to(scores.device))
                sampler = row_sampler(row)
                if sampler.greedy:
                    token = int(argmax(scores)[0])
                else:  # the number plain sampling reads at this position (sampling.py)
                    token = sampler(scores, [row.uniform(row.generated + r)])[0]
                d.tokens.append(token)
                if token not in eos_ids:
                    main.append(b, token)
                    # a draft body feeds a token only to draft the next one
                    fed = fed or body is None or r + 1 < lengths[b]
            if not fed:
                break
            main.forward()
            logits = main.shortlisted_logits()
            for b in range(len(rows)):
                d = drafts[b]
                if lengths[b] and len(d.tokens) == r + 1 and d.tokens[-1] not in eos_ids:
                    d.main_logits.append(logits[b])
                    hidden = main.rows[b].owed
                    if hidden is not None:
                        owed.append((b, r + 1, hidden))
    if body is not None:
        _exact_logits(main, drafts, starts)
    _full_logits(main, drafts, owed)


def _exact_logits(main: MemberBatch, drafts: list[Draft], starts: list[int]) -> None:
    """After drafting with a draft body: one exact forward feeds every position it fed
    (rolled back first: `MemberBatch.forward`) and each row's drafted ids not fed yet, and
    keeps every fed position's logits; those replace or complete each row's `main_logits`
    (position t: after the id at `starts[b] + t - 1`, `starts[b]` the row's first drafted
    id). Positions this forward did not feed were exact already.
    """
    main.fed_logits = [[] for _ in main.rows]
    forward_keeping(main)
    for b, d in enumerate(drafts):
        for t in range(len(main.rows[b].ids) - starts[b] + 1):
            at = fed_logits(main, b, starts[b] + t - 1)
            if t < len(d.main_logits):
                if at is not None:
                    d.main_logits[t] = at
            else:  # a drafted token the draft body did not feed: fed just now
                assert at is not None and t == len(d.main_logits)
                d.main_logits.append(at)
    main.fed_logits = []


def _full_logits(
    main: MemberBatch, drafts: list[Draft], owed: list[tuple[int, int, torch.Tensor]]
) -> None:
    """Replace the shortlisted draft logits `owed` names by the full layer's, in one pass;
    the batch's next-token logits become the full ones too.
    """
    layer = main.member.output_layer
    if not owed or layer is None:
        return
    with torch.no_grad():
        full = layer.logits(torch.stack([h for _, _, h in owed])).float()  # (N, V)
    for p, (b, t, _) in enumerate(owed):
        drafts[b].main_logits[t] = full[p]
    logits = main.shortlisted_logits()
    for b in {b for b, _, _ in owed}:
        logits[b] = drafts[b].main_logits[-1]
    for r in main.rows:
        r.owed = None
