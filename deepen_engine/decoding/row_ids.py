"""A row's token ids in one member, with what its batch keeps of them (`MemberBatch`):
how many are cached, the byte ends a helper's text sync needs, the prompt's running
score, and what a shortlisted or drafted forward left owing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .prompt_scores import RowScore


@dataclass
class RowIds:
    """One row's ids in one member's tokens."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # prompt + generated
    cached: int = 0  # leading ids held in the cache
    fed_positions: int = 0  # positions fed after the prompt (the sync cost)
    ends: list[int] = field(default_factory=list)  # helper: byte end of each generated id
    score: RowScore = field(default_factory=RowScore)  # the prompt's score (prompt_scores.py)
    # (d,) hidden state after the last id while the row's logits cover only a shortlist
    # (`MemberBatch.shortlist`): the full output layer is owed on it
    owed: torch.Tensor | None = None
    # newest cached positions a draft body fed (`MemberBatch.draft_body`): their cache and
    # logits are approximate, and the next exact forward feeds them again
    drafted: int = 0

    @property
    def generated_ids(self) -> list[int]:
        """Ids after the prompt."""
        return self.ids[len(self.prompt_ids) :]
