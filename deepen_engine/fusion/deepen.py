"""Fusing the members' next-token distributions (DeePEn): aggregate in relative space, then
search the main member's logits whose relative distribution matches the aggregate.

Pipeline of `Fuser.fuse`, for a batch of rows:

1. Each member keeps its top-k tokens (special tokens dropped) and maps them to a relative
   distribution over the anchors, `r_i = sum_v p_i(v) rel_i(v)` (alignment/relative.py).
2. Aggregate `r = sum_i w_i r_i` (weights renormalised over members that kept any mass).
3. Candidates: the main member's top tokens, plus its tokens for every anchor another
   member proposed, so a helper can lift a token the main member ranks low.
4. Inverse search: from the main member's logits `z` on the candidates, take `steps`
   AdamW steps on `KL(r || softmax(z) @ R_main)` (mean over the anchors, as the reference),
   with cosine-annealed learning rate. The gradient is analytic, batched over rows.
5. Write the updated candidate logits back into the main member's full logits. Rows whose
   main top token is an end-of-sequence token keep the main member's logits unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..alignment.relative import RelativeSpace
from ..alignment.vocabulary import Anchors
from ..config import FusionConfig
from ..members import Member
from .search import Q_FLOOR, adamw_search


class Fuser:
    """Batched DeePEn fusion over fixed members, anchors and settings.

    Build it with `Fuser.build(members, anchors, config)`; the constructor takes the parts
    directly (tests build small ones by hand).
    """

    @classmethod
    def build(
        cls, members: Sequence[Member], anchors: Anchors | None, config: FusionConfig
    ) -> Fuser:
        """The fuser of loaded members: one relative space per member over the anchors
        (none for a single member, whose `anchors` is None), and which tokens have text.
        """
        has_text = [
            torch.tensor([t is not None for t in m.vocab.texts], dtype=torch.bool)
            for m in members
        ]
        spaces = _relative_spaces(members, anchors, config) if anchors is not None else []
        fuser = cls(
            spaces,
            has_text,
            anchors or Anchors(texts=[], token_ids=[], token_to_anchor=[]),
            config,
            members[config.main].eos_ids,
        )
        fuser.members = list(members)
        return fuser

    def with_config(self, config: FusionConfig) -> Fuser:
        """The same members and anchors with other settings. The relative spaces (and
        their row caches) are shared unless `tau` or `row_cache_size` changed.
        """
        if not self.members:
            raise RuntimeError("with_config needs a fuser made by Fuser.build")
        same_space = (config.tau, config.row_cache_size) == (
            self.config.tau,
            self.config.row_cache_size,
        )
        spaces = self.spaces
        if not same_space and self.spaces:
            spaces = _relative_spaces(self.members, self.anchors, config)
        fuser = type(self)(
            spaces, self.has_text, self.anchors, config, self.members[config.main].eos_ids
        )
        fuser.members = self.members
        return fuser

    def __init__(
        self,
        spaces: Sequence[RelativeSpace],
        has_text: Sequence[torch.Tensor],  # per member (V,) bool: the token has text
        anchors: Anchors,
        config: FusionConfig,
        main_eos_ids: frozenset[int],
    ) -> None:
        self.spaces = list(spaces)
        self.has_text = list(has_text)
        self.anchors = anchors
        self.config = config
        self.main = config.main
        # one weight per member (a single member has no relative space, but a weight of 1)
        self.weights = torch.tensor(config.normalised_weights(len(self.has_text)))
        self.main_eos_ids = torch.tensor(sorted(main_eos_ids), dtype=torch.long)
        self.members: list[Member] = []  # set by build: what with_config rebuilds from

    def logits_needed(self, member: int) -> int | None:
        """How many of member `member`'s top logits per row `fuse` reads (with their log
        normaliser), or None for all of them: a helper's top `top_k`; all of the main
        member's (its candidates' logits are changed in place and sampled from with the
        rest). A member in another process sends only these (decoding/step_protocol.py).
        """
        if member == self.main or self.is_identity:
            return None
        return self.config.top_k

    @property
    def is_identity(self) -> bool:
        """Whether fusion returns the main member's logits unchanged."""
        cfg = self.config
        return cfg.eta == 0 or cfg.steps == 0 or float(self.weights[self.main]) == 1.0

    def fuse(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused logits in the main member's vocabulary.

        logits: per member (B, V_i) next-token logits. Returns (B, V_main) float32.
        """
        main_logits = logits[self.main].float()  # (B, V)
        if self.is_identity:
            return main_logits
        cfg = self.config
        # 1-2. relative distributions of every member, aggregated with the weights.
        proposals: list[torch.Tensor] = []  # per member (B, k) anchor index or -1
        r = torch.zeros(main_logits.shape[0], len(self.anchors))  # (B, A)
        weight_sum = torch.zeros(main_logits.shape[0], 1)  # (B, 1)
        main_top: torch.Tensor | None = None  # (B, max(k, C)) main ids, best first
        for i, (member_logits, space) in enumerate(zip(logits, self.spaces)):
            member_logits = member_logits.float()
            k = min(cfg.top_k, member_logits.shape[-1])
            if i == self.main:
                k_main = min(max(cfg.top_k, cfg.candidates), member_logits.shape[-1])
                top_logits, main_top = member_logits.topk(k_main, dim=-1)
                top_logits, top_ids = top_logits[:, :k], main_top[:, :k]
            else:
                top_logits, top_ids = member_logits.topk(k, dim=-1)  # (B, k)
            # top-k probabilities without materialising the (B, V) softmax
            top_p = (top_logits - member_logits.logsumexp(-1, keepdim=True)).exp()
            top_p = torch.where(self.has_text[i][top_ids], top_p, 0.0)
            r_i = space.distribution(top_p, top_ids)  # (B, A), rows sum to 1 or 0
            kept = (r_i.sum(-1, keepdim=True) > 0).float()
            r += self.weights[i] * r_i
            weight_sum += self.weights[i] * kept
            anchor = space.token_to_anchor[top_ids]
            proposals.append(torch.where(top_p > 0, anchor, -1))
        r = r / weight_sum.clamp(min=1e-30)

        # 3. candidates in the main vocabulary, padded per row: (B, M) ids and mask.
        assert main_top is not None
        cand_ids, valid = self._candidates(main_top[:, : cfg.candidates], proposals)

        # 4. inverse search on the candidate logits.
        z = main_logits.gather(1, cand_ids)  # (B, M)
        z = self._inverse_search(z, valid, cand_ids, r)

        # 5. write back, except rows whose main top token ends the sequence.
        fused = main_logits.clone()
        rows, cols = valid.nonzero(as_tuple=True)  # pads repeat a real id: never write them
        fused[rows, cand_ids[rows, cols]] = z[rows, cols]
        keep_main = torch.isin(main_top[:, 0], self.main_eos_ids)  # (B,) top token ends
        no_candidates = ~valid.any(-1)
        return torch.where((keep_main | no_candidates)[:, None], main_logits, fused)

    def _candidates(
        self, top: torch.Tensor, proposals: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main top tokens (top: (B, C)) plus main tokens of proposed anchors; no specials."""
        main_has_text = self.has_text[self.main]
        main_anchor_ids = self.anchors.token_ids[self.main]
        rows: list[list[int]] = []
        for b in range(top.shape[0]):
            ids = top[b].tolist()
            for i, prop in enumerate(proposals):
                if i == self.main:
                    continue
                anchors = prop[b][prop[b] >= 0]
                ids.extend(main_anchor_ids[anchors].tolist())
            unique = [t for t in dict.fromkeys(ids) if bool(main_has_text[t])]
            rows.append(unique)
        width = max(1, max(len(row) for row in rows))
        cand = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            if row:
                cand[b, : len(row)] = torch.tensor(row)
                cand[b, len(row) :] = row[0]  # pads repeat a real id (masked, never written)
                valid[b, : len(row)] = True
        return cand, valid

    def _inverse_search(
        self, z: torch.Tensor, valid: torch.Tensor, cand_ids: torch.Tensor, r: torch.Tensor
    ) -> torch.Tensor:
        """AdamW on `KL(r || softmax(z) @ R)` with the reference schedule. z: (B, M)."""
        cfg = self.config
        space = self.spaces[self.main]
        num_anchors = r.shape[-1]
        anchor = space.token_to_anchor[cand_ids]  # (B, M)
        one_hot = (anchor >= 0) & valid
        dense = (anchor < 0) & valid
        d_b, d_j = dense.nonzero(as_tuple=True)
        dense_rows = space.non_anchor_rows(cand_ids[d_b, d_j].tolist())  # (n, A)
        anchor_idx = anchor.clamp(min=0)

        if not d_b.numel():
            # Only one-hot rows: q and r matter only at the candidates' own anchors, so the
            # search runs on (B, M) tensors instead of (B, A). Same numbers as below.
            same = (anchor[:, :, None] == anchor[:, None, :]) & one_hot[:, None, :]  # (B,M,M)
            r_at = torch.where(one_hot, r.gather(1, anchor_idx), 0.0)  # (B, M)

            def gradient_of_s(s: torch.Tensor) -> torch.Tensor:
                q_at = (same.float() @ s[:, :, None]).squeeze(-1)  # (B, M)
                ratio = torch.where(q_at > Q_FLOOR, r_at / q_at.clamp(min=Q_FLOOR), 0.0)
                return torch.where(one_hot, -ratio, 0.0) / num_anchors
        else:
            n_dense = torch.arange(d_b.numel())
            owner = torch.zeros(r.shape[0], d_b.numel())  # (B, n) 1 where row b owns row i
            owner[d_b, n_dense] = 1.0

            def gradient_of_s(s: torch.Tensor) -> torch.Tensor:
                # q = softmax(z) @ R over the anchors: one-hot rows scatter, dense rows as
                # one (B, n) @ (n, A) product.
                q = torch.zeros_like(r).scatter_add_(1, anchor_idx, torch.where(one_hot, s, 0.0))
                q.addmm_(owner * s[d_b, d_j][None, :], dense_rows)
                ratio = torch.where(q > Q_FLOOR, r / q.clamp(min=Q_FLOOR), 0.0)  # (B, A)
                # u_j = dL/ds_j = -(1/A) * R_j . (r / q)
                u = torch.where(one_hot, -ratio.gather(1, anchor_idx), 0.0)
                u[d_b, d_j] = -(ratio @ dense_rows.T)[d_b, n_dense]
                return u / num_anchors

        return adamw_search(z, valid, gradient_of_s, cfg)


def _relative_spaces(
    members: Sequence[Member], anchors: Anchors, config: FusionConfig
) -> list[RelativeSpace]:
    return [
        RelativeSpace(
            m.model.get_input_embeddings().weight,
            anchors.token_ids[i],
            anchors.token_to_anchor[i],
            tau=config.tau,
            cache_size=config.row_cache_size,
        )
        for i, m in enumerate(members)
    ]
