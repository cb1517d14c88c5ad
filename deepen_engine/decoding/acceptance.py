"""Which drafted tokens the fused distribution keeps (speculative decoding's verification).

Each verified position's token is the one plain decoding would choose there: the fused
argmax (greedy), or the fused distribution's inverse CDF at the row's number for that
position (sampled, sampling.py). Drafted tokens are kept while they equal it; at the first
mismatch that token is the next one. A main-member draft was drawn at the same numbers
from the drafter's distribution, so it is kept wherever both distributions pick the same
token there; another member's greedy text or a lookup proposal is kept where the fused
choice happens to be it. Either way the output is, token for token, what decoding without
speculation gives (not only distributed like it), greedy and sampled alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import Sampler


def accept_draft(
    sampler: Sampler, fused: torch.Tensor, drafted: Sequence[int], uniforms: Sequence[float]
) -> list[int]:
    """The tokens kept at the verified positions: fused (P, V) logits after 0..P-1 drafted
    tokens, `drafted` the drafted ids (P-1 or P of them), `uniforms[t]` the row's number
    for position t (read only when sampled). The last token is the fused choice at the
    first mismatch, or at the position after the draft; a fully kept draft with no
    position after it ends there.
    """
    chosen = sampler(fused, list(uniforms[: fused.shape[0]]))  # (P,) plain decoding's choices
    kept: list[int] = []
    for t, token in enumerate(chosen):
        kept.append(token)
        if t >= len(drafted) or token != drafted[t]:
            break
    return kept
