"""Small helpers of speculative decoding (speculative.py): one row's draft, a row's
sampler, window and prefix checks, copies of a row's ids, the logits a verification
forward kept, and the check of new rows' speculation settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..members import Member
from .member_batch import MemberBatch
from .row_ids import RowIds
from .rows import NewRow, Row
from .sampling import Sampler


@dataclass
class Draft:
    """One row's draft and what verifying it needs."""

    tokens: list[int] = field(default_factory=list)  # drafted main-member ids
    main_logits: list[torch.Tensor] = field(default_factory=list)  # (V,) after 0..n fed drafts
    texts: list[str] = field(default_factory=list)  # text after 0..n drafted tokens
    positions: int = 1  # positions the helpers read, gaps included (verification.py)

    @property
    def fed(self) -> int:
        """Drafted tokens the main member was fed (an end token is not)."""
        return len(self.main_logits) - 1


def row_sampler(row: Row) -> Sampler:
    """The row's sampler (its temperature, top-k and top-p)."""
    cfg = row.config
    return Sampler(cfg.temperature, cfg.top_k, cfg.top_p)


def fits(ids: list[int], window: int | None) -> bool:
    """Whether `ids` fit a context window (None: no window)."""
    return window is None or len(ids) <= window


def starts(ids: list[int], prefix: list[int]) -> bool:
    """Whether `ids` begin with `prefix`."""
    return ids[: len(prefix)] == prefix


def copy_ids(r: RowIds) -> RowIds:
    """A copy of a row's ids that later edits of the row leave alone."""
    return RowIds(prompt_ids=r.prompt_ids, ids=list(r.ids), cached=r.cached, ends=list(r.ends))


def forward_keeping(batch: MemberBatch) -> None:
    """One forward that keeps every fed position's logits in `batch.fed_logits` (by row,
    read with `fed_logits`), after what it holds already: the caller empties it first for
    this forward alone, and clears it when done.
    """
    batch.keep_fed_logits = True
    try:
        batch.forward()
    finally:
        batch.keep_fed_logits = False


def fed_logits(batch: MemberBatch, b: int, position: int) -> torch.Tensor | None:
    """Row b's logits after `position`, if this forward fed it."""
    for first, block in reversed(batch.fed_logits[b]):  # the latest feed of a position
        if first <= position < first + block.shape[0]:
            return block[position - first]
    return None


DEFAULT_SPECULATE = 4
"""`GenerationConfig.speculate` when unset, with members in process: measured on the default
pair at batch 1 (`deepen bench --speculative`), with bfloat16 drafts about 2.5x the tokens
per second of standard decoding on the bench's prompts and 1.61-1.90x (greedy, whole
requests) on the eval tasks' with the default leader (README, "Speculative decoding");
never slower there, and the same tokens, greedy and sampled. Drafts of 6 and 8 measured no
faster on the eval prompts (with float32 drafts)."""


def settle_speculation(members: Sequence[Member], new: Sequence[NewRow], count: int) -> None:
    """Set each row's `speculate` where it is unset (`DEFAULT_SPECULATE` with members in
    process, 0 with members in Ray actors); raise `ConfigError` for a row that asks for
    speculation with members in Ray actors, or a drafter index that is not one of the
    ensemble's `count` members.
    """
    remote = [m.name for m in members if m.remote is not None]
    for item in new:
        if item.config.speculate is None:
            k = 0 if remote else DEFAULT_SPECULATE
            item.config = item.config.model_copy(update={"speculate": k})
        drafter = item.config.drafter
        if isinstance(drafter, int) and drafter >= count:
            raise ConfigError(
                f"GenerationConfig.drafter={drafter} (row {item.index}) is not a member index: "
                f"the ensemble has {count} members (0 to {count - 1}); set a member index, "
                "'main', 'auto' or 'lookup'.",
                field="drafter",
                owner="GenerationConfig",
            )
        if item.config.speculate and remote:
            raise ConfigError(
                f"speculate={item.config.speculate} (row {item.index}) is not supported yet "
                f"with members in Ray actors ({', '.join(remote)}): set speculate=0, or load "
                "the members in process."
            )
