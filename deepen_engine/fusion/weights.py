"""Per-row member weights from prompt scores (`FusionConfig.weighting="prompt"`).

PackLLM-sim (Mavromatis et al. 2024, arXiv 2404.11531) weights each model by how well it
reads the prompt: `w_i = softmax_i(-score_i / T)`. Our score is the member's bits per UTF-8
byte of the prompt (decoding/prompt_scores.py), which compares across tokenizers where
per-token perplexity does not. The fixed weights (`FusionConfig.weights`, uniform by
default) act as a prior: `w_i ∝ fixed_i * exp(-bpb_i / T)`. A small temperature T hands
nearly all the weight to the member that reads the prompt best; a large one keeps the
fixed weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def prompt_weights(
    bits_per_byte: Sequence[float | None], fixed: Sequence[float], temperature: float
) -> list[float]:
    """Each member's weight for one row, summing to 1.

    `bits_per_byte[i]`: member i's prompt score (None: the prompt left it nothing to score,
    e.g. a single token; the row then keeps the fixed weights). `fixed`: the fixed weights,
    summing to 1. `temperature` > 0.
    """
    if len(bits_per_byte) != len(fixed):
        raise ValueError(f"{len(bits_per_byte)} prompt scores for {len(fixed)} members")
    if any(b is None for b in bits_per_byte):
        return list(fixed)
    logits = [-float(b) / temperature for b in bits_per_byte if b is not None]
    top = max(logits)
    scaled = [w * math.exp(x - top) for w, x in zip(fixed, logits)]
    total = sum(scaled)
    if total <= 0:  # every member with a score has weight 0: nothing to reweight
        return list(fixed)
    return [x / total for x in scaled]


def lowest_score(bits_per_byte: Sequence[float | None], allowed: Sequence[int]) -> int | None:
    """The member (among `allowed`) that reads the prompt best: the lowest bits per byte,
    the first on a tie; None when some allowed member has no score.
    """
    scored = [(bits_per_byte[i], i) for i in allowed]
    if not scored or any(b is None for b, _ in scored):
        return None
    return min(scored, key=lambda pair: (float(pair[0] or 0.0), pair[1]))[1]
