"""Choosing the next token from the fused logits of the main member.

Before sampling, `suppress_end_tokens` masks the main member's end tokens in rows that
have not reached `min_new_tokens` yet.

Pipeline of `Sampler.__call__`, for a batch of rows:

1. temperature 0: argmax (greedy), nothing else runs;
2. divide the logits by the temperature;
3. keep the `top_k` highest logits (0: all);
4. keep the smallest set whose probability reaches `top_p` (1.0: all);
5. draw one token per row from the renormalised distribution by its inverse CDF (in token
   id order) at the row's number for the position (`position_uniform`).

The number for a row's n-th generated token depends only on the row's seed and n: not on
the other rows of the batch, the device, or how many numbers were drawn before. So a
speculative step (decoding/speculative.py) can draft with the drafter's distribution at
the same number and keep a drafted token exactly when the fused distribution's inverse
CDF picks it there too: sampled output is then the same token for token as without
speculation (the coupling is exact; only how often drafts are kept depends on it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..reductions import argmax


def position_uniform(seed: int, position: int) -> float:
    """The number in [0, 1) that chooses the token a row with seed `seed` generates at
    `position` (tokens generated before it).
    """
    return random.Random(f"{seed}:{position}").random()  # seeded through SHA-512


def suppress_end_tokens(
    logits: torch.Tensor, end_ids: torch.Tensor, rows: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """Logits (B, V) with the end tokens `end_ids` set to -inf in the rows where `rows`
    (B,) bool is true (rows below their `min_new_tokens`). `in_place`: the caller owns
    `logits` (fused logits it made, not a member's own), so they are written, not copied.
    """
    if not end_ids.numel() or not bool(rows.any()):
        return logits
    # a copy costs a pass over the logits (about 0.5 ms a step at batch 8 over Gemma-3's
    # 262k); a masked copy and a select cost three
    masked = logits if in_place else logits.clone()
    if bool(rows.all()):
        return masked.index_fill_(1, end_ids, float("-inf"))
    masked[rows.nonzero(), end_ids] = float("-inf")
    return masked


def shares_memory(fused: torch.Tensor, logits: Sequence[object]) -> bool:
    """Whether fused logits share memory with some member's logits (the main member's,
    returned as they are when fusion changes nothing), so they must not be written in
    place; otherwise fusion or a grammar mask made them for this step alone.
    """
    at = fused.untyped_storage().data_ptr()
    return any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == at for x in logits)


class Sampler:
    """Batched next-token choice with temperature, top-k and top-p; each row's draw reads
    its own number for the position (`position_uniform`).
    """

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax."""
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor, uniforms: list[float]) -> list[int]:
        """Next token of each row. logits: (B, V) on any device; `uniforms[b]` is row b's
        number for this position (`position_uniform`; not read when greedy). Only the
        chosen ids leave the device.
        """
        # 1. greedy.
        if self.greedy:
            return argmax(logits).tolist()
        # 2.-4. temperature, top-k, top-p.
        probs = self.probs(logits)
        # 5. the inverse CDF at each row's number: the first token whose cumulative
        # probability passes it (a token of probability 0 never does).
        cdf = probs.cumsum(-1)  # (B, V)
        at = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, at, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
        chosen = tokens.squeeze(1).tolist()
        if bool((probs.gather(1, tokens) == 0).any()):  # rounding at the very end of the CDF
            for b, token in enumerate(chosen):
                if float(probs[b, token]) == 0:
                    chosen[b] = int(probs[b].nonzero()[-1])
        return chosen

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 probabilities each row draws from (steps 2-4; not greedy)."""
        # 2. temperature.
        scores = logits.float() / self.temperature  # (B, V)
        # 3. top-k.
        if self.top_k > 0 and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        # 4. top-p (nucleus): drop tokens once the mass before them reaches top_p.
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
            drop_sorted = before >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores.softmax(-1)
