"""Choosing the next token from the fused logits of the main member.

Before sampling, `suppress_end_tokens` masks the main member's end tokens in rows that
have not reached `min_new_tokens` yet.

Pipeline of `Sampler.__call__`, for a batch of rows:

1. temperature 0: argmax (greedy), nothing else runs;
2. divide the logits by the temperature;
3. keep the `top_k` highest logits (0: all);
4. keep the smallest set whose probability reaches `top_p` (1.0: all);
5. draw one token per row from the renormalised distribution, each row with its own
   seeded generator, so a row's draws do not depend on the other rows of the batch.
"""

from __future__ import annotations

import torch


def suppress_end_tokens(
    logits: torch.Tensor, end_ids: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) with the end tokens `end_ids` set to -inf in the rows where `rows`
    (B,) bool is true (rows below their `min_new_tokens`).
    """
    if not end_ids.numel() or not bool(rows.any()):
        return logits
    masked = logits.index_fill(1, end_ids, float("-inf"))
    return torch.where(rows[:, None], masked, logits)


class Sampler:
    """Batched next-token choice with temperature, top-k and top-p; each row draws from its
    own random generator.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax."""
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
        """Next token of each row. logits: (B, V) on any device; `generators[b]` is row b's
        stream, on that device. Only the chosen ids leave the device.
        """
        # 1. greedy.
        if self.greedy:
            return logits.argmax(-1).tolist()
        # 2.-4. temperature, top-k, top-p.
        probs = self.probs(logits)
        # 5. one draw per row from its own generator.
        draws = [torch.multinomial(probs[b], 1, generator=gen) for b, gen in enumerate(generators)]
        return torch.cat(draws).tolist() if draws else []

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
