"""Per-member index tables of the DeePEn fast path, built once per fuser so that a step
reads each member's logits in as few full-vocabulary passes as it can (`deepen.py`):

- `anchor_tokens`, `anchor_index`: the member's tokens that are anchors and their anchor,
  so the anchor tokens' probabilities are gathered (|anchor tokens| entries) instead of
  masked and scattered over the whole vocabulary. The first `first_count` of them are
  each anchor's lowest token id, in anchor order; when they cover every anchor, their
  probabilities are the relative distribution's anchor part as gathered, and only the
  rest (other tokens of the same text, a few hundred at most) are added to it;
- `non_anchor_bias`: 0 for tokens with text that are not anchors, -inf elsewhere, so one
  add and one top-k find the most probable non-anchor tokens;
- `text_bias`: 0 for tokens with text, -inf for special tokens (a helper's proposals);
- `no_text`: ids of the special tokens, whose probability the mass bound must not count.

All are CPU tensors; the fuser copies them to the device that reads them (`Fuser.on`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemberTables:
    """One member's tables (see the module docstring)."""

    anchor_tokens: torch.Tensor  # (n_a,) long: token ids that are anchors (see above)
    anchor_index: torch.Tensor  # (n_a,) long: their anchor
    first_count: int  # anchors with a token: the first entries, in anchor order
    non_anchor_bias: torch.Tensor  # (V,) float32: 0 or -inf
    text_bias: torch.Tensor  # (V,) float32: 0 or -inf
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
        anchor_tokens = by_id[torch.cat([firsts, rest])]
        minus_inf = torch.tensor(float("-inf"))
        return cls(
            anchor_tokens=anchor_tokens,
            anchor_index=to_anchor[anchor_tokens],
            first_count=int(firsts.numel()),
            non_anchor_bias=torch.where(text & ~is_anchor, 0.0, minus_inf),
            text_bias=torch.where(text, 0.0, minus_inf),
            no_text=(~text).nonzero().squeeze(1),
        )
