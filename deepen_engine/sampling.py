"""Choosing the next token from the fused logits of the main member.

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


class Sampler:
    """Batched next-token choice with temperature, top-k, top-p and per-row seeds."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seeds: list[int]) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.generators = []
        for seed in seeds:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.generators.append(gen)

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax."""
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Next token of each row. logits: (B, V) for the batch rows `rows` (their indices)."""
        # 1. greedy.
        if self.greedy:
            return logits.argmax(-1).tolist()
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
        # 5. one draw per row from its own generator.
        probs = scores.softmax(-1)
        return [
            int(torch.multinomial(probs[b], 1, generator=self.generators[row]))
            for b, row in enumerate(rows)
        ]
