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
        """Fused (B, V_main) float32 logits on the fusion device; logits: per member
        (B, V_i) on its device. Each member's log-probabilities and top-k are made on its
        device; the candidates are worked out on the CPU from the top-k ids, and only the
        log-probabilities of the tokens that score them cross (one gather per member).
        """
        device = self.fusion_device(logits)
        main_logits = logits[self.main].float().to(device)
        logp = [torch.log_softmax(x.float(), dim=-1) for x in logits]  # per member (B, V_i)
        tops = []  # per member (B, k) top values and token ids with a key, on the CPU
        for i, lp in enumerate(logp):
            scores = torch.where(self.on(self.entered[i], lp.device), lp, float("-inf"))
            top = scores.topk(min(self.config.unite_top_k, lp.shape[-1]), dim=-1)
            tops.append((top.values.cpu(), top.indices.cpu()))
        weights = self.row_weights(logits).cpu()  # (B, N)
        batch = main_logits.shape[0]
        plans = [self._plan_row(b, tops) for b in range(batch)]
        scored = self._scored_logp(logp, plans)
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for b, (candidates, tokens) in enumerate(plans):
            fused = self._fuse_row(candidates, tokens, scored[b], weights[b].tolist())
            for (token, _), p in zip(tokens[self.main], fused.tolist()):
                if token >= 0:  # 4. the main member writes each candidate with its token
                    rows.append(b)
                    cols.append(token)
                    values.append(p)
        total = torch.zeros_like(main_logits)  # (B, V_main)
        if rows:
            index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            # accumulate: candidates written by the same main token add up, in order
            total.index_put_(index, torch.tensor(values, device=device), accumulate=True)
        return torch.where(total > 0, total.clamp(min=1e-45).log(), outside_union(main_logits))

    def _plan_row(
        self, b: int, tops: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[tuple[Key, tuple[int, int]]], list[list[tuple[int, bool]]]]:
        """Row b's candidates, each with the member and token it came from (step 1), and
        per member its token for each candidate and whether it scores it (step 2).
        """
        union: dict[Key, tuple[int, int]] = {}
        for j, (values, ids) in enumerate(tops):
            for value, token in zip(values[b].tolist(), ids[b].tolist()):
                key = self.keys[j][token]
                if key is not None and value > float("-inf"):
                    union.setdefault(key, (j, token))
        candidates = list(union.items())
        tokens = [
            self._member_tokens(i, candidates, ids[b].tolist()) for i, (_, ids) in enumerate(tops)
        ]
        return candidates, tokens

    def _scored_logp(
        self,
        logp: list[torch.Tensor],
        plans: list[tuple[list[tuple[Key, tuple[int, int]]], list[list[tuple[int, bool]]]]],
    ) -> list[list[list[float]]]:
        """[row][member] the member's log-probabilities of the tokens that score the row's
        candidates (-inf where it scores none), gathered on each member's device.
        """
        out: list[list[list[float]]] = [[] for _ in plans]
        for i, lp in enumerate(logp):
            at = [(b, t) for b, (_, tokens) in enumerate(plans) for t, s in tokens[i] if s]
            b_idx = torch.tensor([b for b, _ in at], dtype=torch.long, device=lp.device)
            t_idx = torch.tensor([t for _, t in at], dtype=torch.long, device=lp.device)
            found = iter(lp[b_idx, t_idx].tolist())
            for b, (_, tokens) in enumerate(plans):
                out[b].append([next(found) if s else float("-inf") for _, s in tokens[i]])
        return out

    def _fuse_row(
        self,
        candidates: list[tuple[Key, tuple[int, int]]],
        tokens: list[list[tuple[int, bool]]],  # per member: its token per candidate, scored
        scores: list[list[float]],  # per member: its log-probability per candidate
        weights: list[float],  # per member: its weight in this row
    ) -> torch.Tensor:
        """P(s) over the row's candidates (step 3), on the CPU."""
        fused = torch.zeros(len(candidates))  # P(s)
        for i in range(len(tokens)):
            weight = weights[i]
            if weight == 0:
                continue
            # 3. member i's probabilities over the candidates, weighted.
            member_scores = torch.tensor(scores[i])
            if bool(torch.isfinite(member_scores).any()):
                fused += weight * torch.softmax(member_scores, dim=0)
        return fused

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
