"""DeePEn (arXiv 2404.12715): aggregate the members' distributions in relative space, then
search the main member's logits whose relative distribution matches the aggregate.

Pipeline of `DeepenFuser._fuse_rows`, for a batch of rows:

1. Each member's relative distribution over the anchors, `r_i = sum_v p_i(v) rel_i(v)`
   (alignment/relative.py). Every token that is an anchor enters (its row is one-hot: a
   scatter, no cost); non-anchor tokens, whose rows cost a softmax over the anchors each,
   enter in order of probability until those left out hold at most `1 - top_mass` of the
   probability, at most `top_k` of them (`kept_non_anchors`). Special tokens never enter.
   Probabilities are read from the logits only where needed (`_relative`, tables.py).
2. Aggregate `r = sum_i w_i r_i` (`Fuser.row_weights`, renormalised over members that
   kept any mass).
3. Candidates: the main member's top `candidates` tokens, plus its tokens for every anchor
   among another member's top `candidates` tokens, so a helper can lift a token the main
   member ranks low.
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
from ..reductions import block_maxima, exp_, log_normaliser, top_k
from .base import Fuser, register
from .context import FusionContext
from .search import Q_FLOOR, adamw_search
from .tables import MemberTables


def kept_by_mass(
    top_p: torch.Tensor, total: torch.Tensor, top_mass: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each row's most probable non-anchor tokens enter (step 1's mass bound).

    top_p: (B, k) their probabilities, most probable first; total: (B,) the row's whole
    non-anchor probability. Tokens enter while the non-anchor mass not yet entered exceeds
    `1 - top_mass`. Returns the kept probabilities (B, k) (0 where not kept) and the
    probability left out per row (B,).
    """
    before = total[:, None] - (top_p.cumsum(-1) - top_p)  # mass not entered before j
    keep = (before > 1.0 - top_mass) & (top_p > 0)
    kept_p = torch.where(keep, top_p, 0.0)
    leftout = (total - kept_p.sum(-1)).clamp(min=0.0)
    return kept_p, leftout


def kept_non_anchors(
    probs: torch.Tensor, is_anchor: torch.Tensor, top_k: int, top_mass: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast path's non-anchor tokens of each row, most probable first.

    probs: (B, V) probabilities (special tokens at 0); is_anchor: (V,) bool. Tokens enter
    while the non-anchor mass not yet entered exceeds `1 - top_mass`, at most `top_k`.
    Returns ids (B, k), their probabilities (B, k) (0 where not kept) and the probability
    left out per row (B,). (The fuser computes the same from logits, `_relative`.)
    """
    rest = torch.where(is_anchor, 0.0, probs)  # (B, V) non-anchor probabilities
    k = min(top_k, rest.shape[-1])
    top_p, top_ids = rest.topk(k, dim=-1)  # (B, k) sorted
    kept_p, leftout = kept_by_mass(top_p, rest.sum(-1), top_mass)
    return top_ids, kept_p, leftout


@register("deepen")
class DeepenFuser(Fuser):
    """Batched DeePEn fusion over fixed members, anchors and settings.

    `Fuser.build(members, anchors, FusionConfig(method="deepen"))` makes one for loaded
    members; the constructor takes the parts directly (tests build small ones by hand).
    """

    @classmethod
    def from_context(cls, context: FusionContext, config: FusionConfig) -> DeepenFuser:
        """DeePEn over the ensemble's shared relative spaces (none for one member)."""
        spaces: list[RelativeSpace] = []
        if context.anchors.texts:
            spaces = context.spaces(config.tau, config.row_cache_size, config.disk_cache_rows)
        tables = [context.member_tables(i) for i in range(len(spaces))]
        return cls(spaces, context.has_text, context.anchors, config, context.end_ids, tables)

    def __init__(
        self,
        spaces: Sequence[RelativeSpace],
        has_text: Sequence[torch.Tensor],  # per member (V,) bool: the token has text
        anchors: Anchors,
        config: FusionConfig,
        end_ids: Sequence[frozenset[int]],  # per member: its end-of-text token ids
        tables: Sequence[MemberTables] | None = None,  # per member; None: built here
    ) -> None:
        super().__init__(anchors, end_ids, config)
        self.spaces = list(spaces)
        self.has_text = list(has_text)
        self.tables = list(tables) if tables is not None else [
            MemberTables.build(space.token_to_anchor, text)
            for space, text in zip(self.spaces, self.has_text)
        ]  # fmt: skip

    def reserve_rows(self) -> int:
        """Each member's relative-row cache allocated in full (`RelativeSpace.reserve`),
        shared with every fuser of the same tau and cache size; their bytes.
        """
        return sum(space.reserve() for space in self.spaces)

    def logits_needed(self, member: int) -> int | None:
        """How many of member `member`'s top logits per row `fuse` reads (with their log
        normaliser), or None for all of them. A member in another process sends only these
        (remote/protocol.py). All, for every member: the fast path reads every
        anchor token's probability (step 1), and the main member's candidates' logits are
        changed in place and sampled from with the rest.
        """
        return None

    @property
    def is_identity(self) -> bool:
        """Whether fusion returns the main member's logits unchanged."""
        cfg = self.config
        return cfg.eta == 0 or cfg.steps == 0 or super().is_identity

    def _fuse_rows(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused (B, V_main) float32 logits on the fusion device; logits: per member
        (B, V_i) on its device. Each member's relative distribution and proposals are
        made on its device (where its relative space is); (B, A) and (B, C) cross.
        """
        device = self.fusion_device(logits)
        main_logits = logits[self.main].float().to(device)  # (B, V)
        batch = main_logits.shape[0]
        # 1-2. relative distributions of every member, aggregated with the weights.
        proposals: list[torch.Tensor | None] = []  # per helper (B, C) anchor index or -1, CPU
        r = torch.zeros(batch, len(self.anchors), device=device)  # (B, A)
        weight_sum = torch.zeros(batch, 1, device=device)  # (B, 1)
        weights = self.row_weights(logits)  # (B, N)
        for i, (member_logits, space) in enumerate(zip(logits, self.spaces)):
            x = member_logits.float().to(space.device)  # (B, V_i)
            # the main member's block maxima serve its normaliser and its top-k (one pass)
            maxima = block_maxima(x, self.config.candidates) if i == self.main else None
            top = None if maxima is None else maxima.amax(-1, keepdim=True)
            lse = log_normaliser(x, top)  # (B, 1): log of the softmax's normaliser
            # (B, A) rows summing to 1 or 0; (B, C) the top tokens (the main member's with
            # special ones: step 3's; a helper's with text only: its proposals), best first
            r_i, top_x, top_ids = self._relative(x, lse, i, space, i == self.main, maxima)
            w = weights[:, i : i + 1]  # (B, 1)
            r += w * r_i.to(device)
            weight_sum += w * (r_i.sum(-1, keepdim=True) > 0).float().to(device)
            if i == self.main:
                main_top = top_ids.to(device)
                proposals.append(None)
                continue
            top_p = exp_(top_x - lse)  # (B, C) proposals: anchors among them
            proposal = torch.where(top_p > 0, space.token_to_anchor[top_ids], -1)
            proposals.append(proposal.cpu())  # read row by row on the CPU (_candidates)
        r = r / weight_sum.clamp(min=1e-30)

        # 3. candidates in the main vocabulary, padded per row: (B, M) ids and mask.
        cand_ids, valid = self._candidates(main_top.cpu(), proposals)
        cand_ids, valid = cand_ids.to(device), valid.to(device)

        # 4. inverse search on the candidate logits.
        z = main_logits.gather(1, cand_ids)  # (B, M)
        z = self._inverse_search(z, valid, cand_ids, r)

        # 5. write back, except rows whose main top token ends the sequence (their rows
        # keep the main member's logits; a row without candidates has nothing to write).
        keep_main = torch.isin(main_top[:, 0], self.on(self.main_eos_ids, device))  # (B,)
        fused = main_logits.clone()
        rows, cols = (valid & ~keep_main[:, None]).nonzero(as_tuple=True)  # never the pads
        fused[rows, cand_ids[rows, cols]] = z[rows, cols]
        return fused

    def _relative(
        self,
        x: torch.Tensor,
        lse: torch.Tensor,
        i: int,
        space: RelativeSpace,
        specials: bool,
        maxima: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Member i's (B, A) relative distributions (step 1), normalised, and its top
        `candidates` logits and token ids (B, C), best first: among the tokens with text,
        or among all tokens with `specials`. x: its (B, V) logits, lse (B, 1) their
        log-sum-exp, maxima its `block_maxima` if read. On the space's device, where `x` is.

        Probabilities are `exp(x - lse)`, read only where needed: gathered at the anchor
        tokens, and at the top non-anchor tokens (one add of a 0/-inf table and one
        top-k). The non-anchor mass for the bound is what the anchor and special tokens
        leave of 1, so no pass masks or sums the whole vocabulary. The main member's top
        tokens are one top-k of its vocabulary (`reductions.top_k`, read in blocks); a
        helper's, which exclude special tokens, one top-k after adding its 0/-inf text
        table (`MemberTables.text_bias`). `exp_` and
        `log_normaliser` (reductions.py) take exponentials through `exp2`.
        """
        cfg = self.config
        tables = self.tables[i]
        dev = x.device
        no_text = self.on(tables.no_text, dev)
        x_anchor = x.index_select(1, self.on(tables.anchor_read, dev))  # (B, n_a)
        if tables.anchor_order is not None:  # read by id: put in anchor_tokens' order
            x_anchor = x_anchor.index_select(1, self.on(tables.anchor_order, dev))
        p_anchor = exp_(x_anchor.sub_(lse))  # x_anchor is a copy (index_select)
        n = tables.first_count if tables.first_count == space.num_anchors else 0
        if n:  # every anchor's first token, in anchor order: (B, A) as gathered
            out = p_anchor[:, :n].clone()  # a copy: out is added to, p_anchor read again
        else:
            out = torch.zeros(x.shape[0], space.num_anchors, device=dev)  # (B, A)
        out.index_add_(1, self.on(tables.anchor_index, dev)[n:], p_anchor[:, n:])
        c = min(cfg.candidates, x.shape[-1])
        k = min(cfg.top_k, x.shape[-1])
        x_special = x.index_select(1, no_text)  # (B, n_s)
        special = exp_(x_special - lse).sum(-1)  # (B,)
        total = (1.0 - p_anchor.sum(-1) - special).clamp(min=0.0)  # (B,) non-anchor mass
        # (B, k): the mass bound's tokens, the most probable non-anchor tokens
        top_x, ids = top_k(x + self.on(tables.non_anchor_bias, dev), k)
        top_p = exp_(top_x - lse)  # 0 past the last non-anchor token
        kept_p, _ = kept_by_mass(top_p, total, cfg.top_mass)
        b_idx, j_idx = (kept_p > 0).nonzero(as_tuple=True)
        if b_idx.numel():  # rows ascending, distinct ids per row (topk)
            tokens = ids[b_idx, j_idx].tolist()
            out += space.weighted_sum(tokens, b_idx, kept_p[b_idx, j_idx], x.shape[0])
        # normalised in place (a row without mass is all 0 and stays so)
        relative = out.div_(out.sum(-1, keepdim=True).clamp(min=1e-30))
        if specials:  # every token: one top-k over the vocabulary (read in blocks)
            return (relative, *top_k(x, c, maxima))
        # a helper's top tokens with text: one add and one top-k (read in blocks)
        return (relative, *top_k(x + self.on(tables.text_bias, dev), c))

    def _candidates(
        self, top: torch.Tensor, proposals: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main top tokens (top: (B, C)) plus main tokens of proposed anchors; no specials.
        Per row: the main member's tokens first, then each helper's in its order, each id
        once. On the CPU (the caller moves them): the lookups are whole-batch tensor ops
        and one `tolist`, so the per-row work is plain Python on a few dozen ints.
        """
        main_anchor_ids = self.anchors.token_ids[self.main]
        parts = [top]
        for prop in proposals:
            if prop is not None:  # None: the main member itself
                parts.append(torch.where(prop >= 0, main_anchor_ids[prop.clamp(min=0)], -1))
        ids = torch.cat(parts, dim=1)  # (B, C + C * helpers) main ids, -1: none
        ids = torch.where(self.has_text[self.main][ids.clamp(min=0)] & (ids >= 0), ids, -1)
        rows = [[t for t in dict.fromkeys(row) if t >= 0] for row in ids.tolist()]
        width = max(1, max(len(row) for row in rows))
        # pads repeat a real id (masked, never written)
        cand = [row + row[:1] * (width - len(row)) if row else [0] * width for row in rows]
        valid = [[True] * len(row) + [False] * (width - len(row)) for row in rows]
        return torch.tensor(cand, dtype=torch.long), torch.tensor(valid, dtype=torch.bool)

    def _inverse_search(
        self, z: torch.Tensor, valid: torch.Tensor, cand_ids: torch.Tensor, r: torch.Tensor
    ) -> torch.Tensor:
        """AdamW on `KL(r || softmax(z) @ R)` with the reference schedule. z: (B, M), on
        the fusion device; the main member's rows come from its space's device.

        A row whose candidates are all anchors (one-hot rows) has q and r mattering only
        at its candidates' own anchors: its gradient is a (M, M) product. Only rows with a
        non-anchor candidate work over all anchors, each with its own dense rows.
        """
        cfg = self.config
        space = self.spaces[self.main]
        num_anchors = r.shape[-1]
        device = z.device
        anchor = self.on(space.token_to_anchor, device)[cand_ids]  # (B, M)
        one_hot = (anchor >= 0) & valid
        anchor_idx = anchor.clamp(min=0)
        # one-hot candidates: q at a candidate's anchor sums the candidates of that anchor
        # in its row; `group` numbers each row's distinct anchors (all others share -1's)
        keys = (
            torch.where(one_hot, anchor, -1)
            + (num_anchors + 1) * torch.arange(len(anchor), device=device)[:, None]
        )
        groups_of, group = torch.unique(keys, return_inverse=True)  # (G,), (B, M)
        r_at = torch.where(one_hot, r.gather(1, anchor_idx), 0.0)  # (B, M)
        # rows with a non-anchor candidate: D of them, n dense rows in all, grouped by row
        dense = (anchor < 0) & valid  # (B, M)
        rows_d = dense.any(-1).nonzero().squeeze(1)  # (D,)
        e_b, e_j = dense[rows_d].nonzero(as_tuple=True)  # (n,): entry -> its row in D, column
        dense_rows = space.non_anchor_rows(cand_ids[rows_d][e_b, e_j].tolist()).to(device)
        r_d, idx_d, one_hot_d = r[rows_d], anchor_idx[rows_d], one_hot[rows_d]  # (D, A), (D, M)
        counts = torch.bincount(e_b, minlength=len(rows_d))  # (D,) dense rows of each row
        offsets = counts.cumsum(0) - counts  # where each row's dense rows start (e_b ascends)
        groups = list(zip(offsets.tolist(), counts.tolist()))
        entries = torch.arange(len(e_b), device=device)

        def gradient_of_s(s: torch.Tensor) -> torch.Tensor:
            s_one_hot = torch.where(one_hot, s, 0.0).flatten()
            q_group = torch.zeros(len(groups_of), device=device).index_add_(
                0, group.flatten(), s_one_hot
            )
            # (B, M) q at each candidate's anchor; at most Q_FLOOR: inf, so r / q is 0
            q_at = torch.nn.functional.threshold(q_group[group], Q_FLOOR, float("inf"), True)
            u = r_at.div(q_at).neg_()  # (B, M) dL/ds * A; 0 off the one-hot candidates (r_at)
            if rows_d.numel():
                # q = softmax(z) @ R over all anchors: one-hot rows scatter, each row's dense
                # rows are summed in one bag (no (n, A) temporary)
                s_d = s[rows_d]  # (D, M)
                q = torch.nn.functional.embedding_bag(
                    entries, dense_rows, offsets, mode="sum", per_sample_weights=s_d[e_b, e_j]
                )
                q.scatter_add_(1, idx_d, torch.where(one_hot_d, s_d, 0.0))
                # anchors the candidates cannot reach carry no gradient: q there becomes
                # inf, so r / q is 0 (one pass, where a mask and a fill took two more)
                torch.nn.functional.threshold(q, Q_FLOOR, float("inf"), inplace=True)
                ratio = torch.div(r_d, q, out=q)  # (D, A), in q's place
                # u_j = dL/ds_j * A = -R_j . (r / q): a product per row's dense rows
                u_d = torch.where(one_hot_d, -ratio.gather(1, idx_d), 0.0)
                dots = [dense_rows[o : o + c] @ ratio[d] for d, (o, c) in enumerate(groups)]
                u_d[e_b, e_j] = -torch.cat(dots)
                u[rows_d] = u_d
            return u / num_anchors

        return adamw_search(z, valid, gradient_of_s, cfg)
