"""GaC (Yu et al., arXiv 2406.12585): the members' whole next-token distributions averaged
over the union of their vocabularies, tokens matched by their exact text.

`UnionFuser._fuse_rows`, for a batch of rows:

1. Each member's distribution `p_i` over its tokens that have text or end the text (other
   special tokens are dropped and the rest renormalised).
2. Each token goes to the main member's token with the same text (`END`: the main
   member's first end token). A token whose text the main member lacks goes to the main
   member's longest token that starts that text: the main member writes that piece now and
   the members go on from the new text (GaC instead hands the whole text to every member;
   one step writes one main-member token here).
3. `P(t) = sum_i w_i sum_{v -> t} p_i(v)` over the main member's tokens t (`w_i`: each
   row's weights, `Fuser.row_weights`); the fused logits are `log P` (tokens no member
   maps to: see `outside_union`).

The members' probabilities are added whole, so the rule is symmetric in the members: the
main member only decides which vocabulary writes the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import FusionConfig
from .base import Fuser, outside_union, register
from .context import FusionContext


@register("union")
class UnionFuser(Fuser):
    """Average of the members' distributions over the union vocabulary (GaC)."""

    @classmethod
    def from_context(cls, context: FusionContext, config: FusionConfig) -> UnionFuser:
        """GaC fusion over the ensemble's token maps."""
        return cls(context, config)

    def __init__(self, context: FusionContext, config: FusionConfig) -> None:
        super().__init__(context.anchors, context.end_ids, config)
        # per member (V_i,): the main member's token each token goes to, or -1 (dropped)
        self.to_main = [context.token_map(i, self.main) for i in range(len(context.members))]

    def _fuse_rows(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused (B, V_main) float32 logits on the fusion device; logits: per member
        (B, V_i) on its device. A member's probabilities are made on its device and cross
        whole, (B, V_i), when it is elsewhere: this method reads every token of every member.
        """
        device = self.fusion_device(logits)
        main_logits = logits[self.main].float().to(device)
        total = torch.zeros_like(main_logits)  # (B, V_main) P(t)
        weights = self.row_weights(logits)  # (B, N)
        for i, member_logits in enumerate(logits):
            weight = weights[:, i : i + 1]  # (B, 1)
            if not bool((weight > 0).any()):
                continue
            # 1. p_i over the tokens that enter, renormalised (on the member's device).
            here = member_logits.device
            to_main = self.on(self.to_main[i], here)  # (V_i,)
            probs = torch.softmax(member_logits.float(), dim=-1)  # (B, V_i)
            probs = torch.where(to_main >= 0, probs, 0.0)
            probs = (probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)).to(device)
            # 2-3. onto the main member's tokens.
            to_main = self.on(self.to_main[i], device)
            index = to_main.clamp(min=0).expand_as(probs)  # dropped tokens add 0 to id 0
            total.scatter_add_(1, index, weight * probs)
        return torch.where(total > 0, total.clamp(min=1e-45).log(), outside_union(main_logits))
