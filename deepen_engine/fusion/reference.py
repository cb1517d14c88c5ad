"""DeePEn fusion over the full vocabularies, to check the fast path (deepen.py).

The fast path keeps each member's anchor tokens and its most probable non-anchor tokens
(by mass, with a cap), and searches the main member's top tokens plus those the others
propose. `ReferenceFuser` follows the same formulas with every token that has text:

1. Each member's relative distribution `r_i = sum_v p_i(v) rel_i(v)` over its whole
   vocabulary: anchor tokens land on their anchor (one-hot rows, as in the fast path),
   other tokens through their exact relative rows, computed in chunks of tokens.
2. The inverse search runs on every main-member token with text (all of its anchor tokens
   and the same non-anchor tokens as in step 1), with the same AdamW schedule.

Memory stays at (rows kept) x |A|, never |V| x |A|. What costs time is the non-anchor
rows: each is a softmax over all anchors, and Gemma-3 has ~216,000 non-anchor tokens
(minutes per step on a CPU). So by default a member's non-anchor tokens enter in order of
probability until the ones left out hold at most `leftout_mass` of its probability (the
left-out mass is reported for every step); `leftout_mass=0` is the literal full-vocabulary
computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .deepen import DeepenFuser
from .search import Q_FLOOR, adamw_search


@dataclass
class ReferenceStep:
    """One row's reference fusion."""

    logits: torch.Tensor
    """(V_main,) fused logits."""
    leftout_mass: list[float]
    """Per member: probability of the non-anchor tokens left out (0.0 when exact)."""
    rows_used: list[int]
    """Per member: non-anchor tokens that entered."""


class ReferenceFuser:
    """Full-vocabulary DeePEn fusion with the settings of a fast-path `DeepenFuser`.

    Args:
        fuser: the fast path to mirror (members' relative spaces, weights, settings).
        leftout_mass: a member's lowest-probability non-anchor tokens may be left out while
            together they hold at most this much probability. 0: every token (exact).
        row_cache: non-anchor rows kept between steps per member (each is |A| floats).
    """

    def __init__(
        self, fuser: DeepenFuser, leftout_mass: float = 1e-4, row_cache: int = 8192
    ) -> None:
        if not isinstance(fuser, DeepenFuser):
            raise TypeError(
                f"ReferenceFuser checks DeePEn's fast path; got a {type(fuser).__name__} "
                f"(method {fuser.method!r}), whose fusion has no approximation to check."
            )
        if leftout_mass < 0 or leftout_mass >= 1:
            raise ValueError(f"leftout_mass must be in [0, 1), got {leftout_mass}.")
        self.fuser = fuser
        self.leftout_mass = leftout_mass
        # own row caches, so the reference never evicts the fast path's rows
        self._spaces = [space.with_row_cache(row_cache) for space in fuser.spaces]

    def fuse_row(
        self, logits: Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> ReferenceStep:
        """Fused logits of one row; logits: per member (V_i,) next-token logits; weights:
        the row's (N,) member weights when its fusion took them from its prompt
        (`StepRecord.weights`), else None: the fuser's own.
        """
        fuser, cfg = self.fuser, self.fuser.config
        main = fuser.main
        device = self._spaces[main].device  # the search runs where the main member's rows are
        main_logits = logits[main].float().to(device)
        num_anchors = len(fuser.anchors)
        # 1. every member's relative distribution over the anchors (on its space's device).
        r = torch.zeros(num_anchors, device=device)
        weight_sum = 0.0
        if weights is None:
            weights = fuser.row_weights([x.float()[None, :] for x in logits])[0]  # (N,)
        leftout: list[float] = []
        used: list[int] = []
        main_rest: torch.Tensor | None = None  # the main member's non-anchor ids that entered
        rest_rows: torch.Tensor | None = None  # and their relative rows, (n_r, A)
        for i, (member_logits, space) in enumerate(zip(logits, self._spaces)):
            probs = torch.softmax(member_logits.float().to(space.device), dim=-1)
            probs = torch.where(fuser.on(fuser.has_text[i], space.device), probs, 0.0)
            to_anchor = space.token_to_anchor
            is_anchor = to_anchor >= 0
            r_i = torch.zeros(num_anchors, device=space.device)
            r_i.index_add_(0, to_anchor[is_anchor], probs[is_anchor])
            rest_ids, left = self._rest(probs, ~is_anchor & (probs > 0))
            rows = space.non_anchor_rows(rest_ids.tolist())  # (n, A)
            r_i += probs[rest_ids] @ rows
            mass = float(r_i.sum())
            if mass > 0:
                r += float(weights[i]) * (r_i / mass).to(device)
                weight_sum += float(weights[i])
            leftout.append(left)
            used.append(int(rest_ids.numel()))
            if i == main:
                main_rest, rest_rows = rest_ids.to(device), rows.to(device)
        r = r / max(weight_sum, 1e-30)
        keep_main = int(main_logits.argmax()) in set(fuser.main_eos_ids.tolist())
        if keep_main or weight_sum == 0:
            return ReferenceStep(main_logits, leftout, used)

        # 2. inverse search on the main member's anchor tokens and entered non-anchor tokens.
        assert main_rest is not None and rest_rows is not None
        space = fuser.spaces[main]
        has_text = fuser.on(fuser.has_text[main], device)
        anchor_ids = ((space.token_to_anchor.to(device) >= 0) & has_text).nonzero().squeeze(1)
        anchor_of = space.token_to_anchor.to(device)[anchor_ids]  # (n_a,)
        cand = torch.cat([anchor_ids, main_rest])
        n_a = anchor_ids.numel()

        def gradient_of_s(s: torch.Tensor) -> torch.Tensor:
            s = s[0]
            q = torch.zeros(num_anchors, device=device).index_add_(0, anchor_of, s[:n_a])
            q += s[n_a:] @ rest_rows
            ratio = torch.where(q > Q_FLOOR, r / q.clamp(min=Q_FLOOR), 0.0)
            u = torch.cat([-ratio[anchor_of], -(rest_rows @ ratio)])
            return (u / num_anchors)[None, :]

        z = main_logits[cand][None, :]
        valid = torch.ones_like(z, dtype=torch.bool)
        z = adamw_search(z, valid, gradient_of_s, cfg)[0]
        fused = main_logits.clone()
        fused[cand] = z
        return ReferenceStep(fused, leftout, used)

    def _rest(self, probs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Non-anchor ids that enter (most probable first) and the probability left out."""
        ids = mask.nonzero().squeeze(1)
        if self.leftout_mass == 0 or ids.numel() == 0:
            return ids, 0.0
        p, order = probs[ids].sort(descending=True)
        # after[j]: mass of the tokens ranked below j; take tokens until it fits the bound
        after = p.sum() - p.cumsum(0)
        n = int((after > self.leftout_mass).sum()) + 1
        n = min(n, ids.numel())
        return ids[order[:n]], float(after[n - 1])
