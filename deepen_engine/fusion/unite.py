"""UniTE (Yao et al., arXiv 2410.03777, ICLR 2025): the union of each member's top-k
tokens, every member scoring every candidate.

`UniteFuser._fuse_rows`, for each row:

1. Candidates: each member's `unite_top_k` most probable tokens that have text or end the
   text, as texts (`END` for end tokens), in member order then rank, each text once.
2. Each member scores each candidate with its token of the same text; when it has none,
   with its longest token that starts the text (the paper: the first token of the
   member's own tokenisation of it). A member's token scores one candidate only: a token
   whose text is the candidate first, else the earliest candidate that falls back on it;
   the member gives the others probability 0 (the reference code gives them logit 0).
3. Each member's scores are renormalised over the candidates (a softmax of its logits on
   them), then averaged with the weights: `P(s) = sum_i w_i p_i(s)`.
4. The main member writes the chosen candidate: its token for `s` is the one of step 2
   (the first piece of `s` when it lacks `s` whole); `P` is summed per main token, and the
   fused logits are `log P` (other tokens: see `outside_union`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import FusionConfig
from .base import Fuser, outside_union, register
from .context import FusionContext

Key = bytes  # a candidate: its text, or END


@register("unite")
class UniteFuser(Fuser):
    """Union of the members' top-k tokens, scored by every member (UniTE)."""

    @classmethod
    def from_context(cls, context: FusionContext, config: FusionConfig) -> UniteFuser:
        """UniTE fusion over the ensemble's token maps."""
        return cls(context, config)

    def __init__(self, context: FusionContext, config: FusionConfig) -> None:
        super().__init__(context.anchors, context.end_ids, config)
        self.context = context
        n = len(context.members)
        self.keys = [context.keys(i) for i in range(n)]
        # maps[j][i] (V_j,): member i's token for member j's token's text (or its start)
        self.maps = [[context.token_map(j, i) for i in range(n)] for j in range(n)]
        # per member (V_i,) bool: the token can be a candidate (it has text or ends it)
        self.entered = [torch.tensor([k is not None for k in keys]) for keys in self.keys]

    def _fuse_rows(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused (B, V_main) float32 logits; logits: per member (B, V_i)."""
        main_logits = logits[self.main].float()
        logp = [torch.log_softmax(x.float(), dim=-1) for x in logits]  # per member (B, V_i)
        tops = []  # per member (B, k) top token ids with a key
        for i, lp in enumerate(logp):
            scores = torch.where(self.entered[i], lp, float("-inf"))
            tops.append(scores.topk(min(self.config.unite_top_k, lp.shape[-1]), dim=-1))
        total = torch.zeros_like(main_logits)  # (B, V_main)
        weights = self.row_weights(logits)  # (B, N)
        for b in range(main_logits.shape[0]):
            row_tops = [(t.values[b], t.indices[b]) for t in tops]
            self._fuse_row(b, [x[b] for x in logp], row_tops, weights[b].tolist(), total)
        return torch.where(total > 0, total.clamp(min=1e-45).log(), outside_union(main_logits))

    def _fuse_row(
        self,
        b: int,
        logp: list[torch.Tensor],  # per member (V_i,) log-probabilities of row b
        tops: list[tuple[torch.Tensor, torch.Tensor]],  # per member (k,) values and ids
        weights: list[float],  # per member: its weight in row b
        total: torch.Tensor,  # (B, V_main) written in row b
    ) -> None:
        # 1. candidates, each with the member and token it came from.
        union: dict[Key, tuple[int, int]] = {}
        for j, (values, ids) in enumerate(tops):
            for value, token in zip(values.tolist(), ids.tolist()):
                key = self.keys[j][token]
                if key is not None and value > float("-inf"):
                    union.setdefault(key, (j, token))
        candidates = list(union.items())
        fused = torch.zeros(len(candidates))  # P(s)
        main_tokens: list[int] = []
        for i in range(len(logp)):
            # 2. member i's token for each candidate, one candidate per token.
            tokens = self._member_tokens(i, candidates, tops[i][1].tolist())
            if i == self.main:
                main_tokens = [t for t, _ in tokens]
            weight = weights[i]
            if weight == 0:
                continue
            # 3. member i's probabilities over the candidates, weighted.
            scores = torch.tensor(
                [float(logp[i][t]) if scored else float("-inf") for t, scored in tokens]
            )
            if bool(torch.isfinite(scores).any()):
                fused += weight * torch.softmax(scores, dim=0)
        # 4. the main member writes each candidate with its token.
        for token, p in zip(main_tokens, fused.tolist()):
            if token >= 0:
                total[b, token] += p

    def _member_tokens(
        self, i: int, candidates: list[tuple[Key, tuple[int, int]]], own_top: list[int]
    ) -> list[tuple[int, bool]]:
        """Member i's token for each candidate (-1: none) and whether it scores it: a token
        whose text is the candidate first, then the earliest candidate falling back on it.
        """
        own = {self.keys[i][t]: t for t in reversed(own_top)}  # its top-k by text, best kept
        tokens = []
        for key, (j, source_token) in candidates:
            token = own.get(key)
            if token is None:
                token = int(self.maps[j][i][source_token])
            tokens.append(token)
        exact = [t >= 0 and (self.keys[i][t] == key) for t, (key, _) in zip(tokens, candidates)]
        claimed = {t for t, whole in zip(tokens, exact) if whole}
        out = []
        for t, whole in zip(tokens, exact):
            if whole:
                out.append((t, True))
            elif t >= 0 and t not in claimed:
                claimed.add(t)
                out.append((t, True))
            else:
                out.append((t, False))
        return out
