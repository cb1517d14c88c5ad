"""Per-member index tables of the DeePEn fast path, built once per fuser so that a step
reads each member's logits in as few full-vocabulary passes as it can (`deepen.py`):

- `anchor_tokens`, `anchor_index`: the member's tokens that are anchors and their anchor,
  so the anchor tokens' probabilities are gathered (|anchor tokens| entries) instead of
  masked and scattered over the whole vocabulary. The first `first_count` of them are
  each anchor's lowest token id, in anchor order; when they cover every anchor, their
  probabilities are the relative distribution's anchor part as gathered, and only the
  rest (other tokens of the same text, a few hundred at most) are added to it;
- `anchor_read`, `anchor_order`: for a large vocabulary, the same tokens by ascending id
  and where each of `anchor_tokens` is among them: `x.index_select(1,
  anchor_read).index_select(1, anchor_order)` equals `x.index_select(1, anchor_tokens)`
  and costs less on Gemma-3's 8 x 262k logits (the first read walks each row forward; the
  second jumps about in 46k values that stay in the cache): 0.43 against 0.57 ms right
  after a pass over the rows, as in the fuser, 0.52 against 1.06 ms cold. For a
  vocabulary whose rows fit the cache (SmolLM2's 49k) one read is faster there (0.18
  against 0.28 ms): `anchor_read` is `anchor_tokens` and `anchor_order` None. (`python
  scripts/fusion_cost.py passes steps.pt`);
- `non_anchor_bias`: 0 for tokens with text that are not anchors, -inf elsewhere, so one
  add and one top-k find the most probable non-anchor tokens;
- `text_bias`: 0 for tokens with text, -inf for special tokens, so one add and one top-k
  find a helper's most probable tokens with text (its proposals): 0.32 against 0.51 ms
  for SmolLM2's 8 x 49k logits where the top of its anchor tokens (46k, not whole
  blocks, `torch.topk`) was merged with the top non-anchor tokens;
- `no_text`: ids of the special tokens, whose probability the mass bound must not count.

All are CPU tensors; the fuser copies them to the device that reads them (`Fuser.on`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TWO_READS_FROM = 1 << 17
"""Vocabularies larger than this read their anchor tokens' logits in two steps (above)."""


@dataclass(frozen=True)
class MemberTables:
    """One member's tables (see the module docstring)."""

    anchor_tokens: torch.Tensor  # (n_a,) long: token ids that are anchors (see above)
    anchor_index: torch.Tensor  # (n_a,) long: their anchor
    first_count: int  # anchors with a token: the first entries, in anchor order
    anchor_read: torch.Tensor  # (n_a,) long: the anchor tokens by ascending id
    anchor_order: torch.Tensor | None  # (n_a,) long: position in anchor_read of each of
    # anchor_tokens; None: anchor_read is anchor_tokens
    non_anchor_bias: torch.Tensor  # (V,) float32: 0 or -inf
    text_bias: torch.Tensor  # (V,) float32: 0 (a token with text) or -inf
    no_text: torch.Tensor  # (n_s,) long: special token ids

    @classmethod
    def build(cls, token_to_anchor: torch.Tensor, has_text: torch.Tensor) -> MemberTables:
        """Tables from a member's (V,) anchor map (-1: not an anchor) and (V,) text mask."""
        to_anchor = token_to_anchor.cpu()
        text = has_text.cpu()
        is_anchor = (to_anchor >= 0) & text
        by_id = is_anchor.nonzero().squeeze(1)  # ascending ids
        anchor_of = to_anchor[by_id]
        # each anchor's lowest id first, in anchor order; then the others, by id
        order = torch.sort(anchor_of, stable=True).indices
        sorted_anchor = anchor_of[order]
        first = torch.ones_like(sorted_anchor, dtype=torch.bool)
        first[1:] = sorted_anchor[1:] != sorted_anchor[:-1]
        firsts, rest = order[first], torch.sort(order[~first]).values
        positions = torch.cat([firsts, rest])  # into by_id
        anchor_tokens = by_id[positions]
        minus_inf = torch.tensor(float("-inf"))
        large = to_anchor.numel() > TWO_READS_FROM
        return cls(
            anchor_tokens=anchor_tokens,
            anchor_index=to_anchor[anchor_tokens],
            first_count=int(firsts.numel()),
            anchor_read=by_id if large else anchor_tokens,
            anchor_order=positions if large else None,
            non_anchor_bias=torch.where(text & ~is_anchor, 0.0, minus_inf),
            text_bias=torch.where(text, 0.0, minus_inf),
            no_text=(~text).nonzero().squeeze(1),
        )
