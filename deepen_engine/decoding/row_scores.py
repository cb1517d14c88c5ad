"""The decoding loop's side of prompt scores: whether a prefill scores, what each row
keeps of the scores, and each row's prompt weights (`weighting="prompt"`).

The scores themselves are computed in the members' batches (prompt_scores.py); the weights
rule is fusion/weights.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..fusion.weights import prompt_weights
from ..members import Member
from .member_batch import MemberBatch
from .rows import Prepared, Row


def start_scoring(
    batches: Sequence[MemberBatch], members: Sequence[Member], prepared: Prepared
) -> None:
    """Make the new rows' prefill score their prompts when some row's fusion reads the
    scores and has none yet (a `main="auto"` row was scored before it joined), each row
    over its `prompt_score` span. Set before the batches' first forward: a member in a Ray
    actor scores there, its batch's first call carrying the spans (remote/batch.py).
    """
    rows = prepared.rows
    before = prepared.scores or [{}] * len(rows)
    if len(members) == 1 or not any(
        r.fuser.config.weighting == "prompt" and not scored for r, scored in zip(rows, before)
    ):
        return
    for batch in batches:
        batch.score_prompts = True
        for ids, row in zip(batch.rows, rows):
            ids.score.span = row.fuser.config.prompt_score


def note_scores(prepared: Prepared, batches: Sequence[MemberBatch], index: Sequence[int]) -> None:
    """What the prefilled rows' results report: their leader, and their prompt scores
    (from before they joined, `main="auto"`, or from this prefill if it scored; `index`:
    the ensemble indices of the members run).
    """
    for row, before in zip(prepared.rows, prepared.scores or [{}] * len(prepared.rows)):
        fuser = row.fuser
        names = [m.name for m in fuser.members]
        row.usage.leader = names[fuser.main] if names else ""
        for i, bpb in before.items():
            row.prompt_scores[i] = bpb
            row.usage.prompt_bits_per_byte[names[i]] = bpb
    if not batches or not batches[0].score_prompts:
        return
    for b, row in enumerate(prepared.rows):
        for batch, i in zip(batches, index):
            bpb = batch.rows[b].score.bits_per_byte
            row.prompt_scores[i] = bpb
            row.usage.prompt_bits_per_byte[batch.member.name] = bpb


def fuse_rows(rows: Sequence[Row], logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fused (b, V_main) logits of rows sharing one fuser, with their prompt weights."""
    return rows[0].fuser.fuse(logits, row_weights(rows))


def step_weights(rows: Sequence[Row]) -> torch.Tensor | None:
    """The step's (B, N) prompt weights for `StepRecord.weights`: None unless every row
    shares one fuser that reads prompt scores.
    """
    if not rows or len({id(r.fuser) for r in rows}) != 1:
        return None
    return row_weights(rows)


def row_weights(rows: Sequence[Row]) -> torch.Tensor | None:
    """(b, N) prompt weights of rows sharing one fuser, or None when their fusion does
    not read prompt scores (fusion/weights.py).
    """
    fuser = rows[0].fuser
    cfg = fuser.config
    if cfg.weighting != "prompt":
        return None
    fixed = fuser.weights.tolist()
    return torch.tensor(
        [
            prompt_weights(
                [r.prompt_scores.get(i) for i in range(len(fixed))], fixed, cfg.weight_temperature
            )
            for r in rows
        ]
    )
