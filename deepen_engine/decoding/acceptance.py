"""Which drafted tokens the fused distribution keeps (speculative decoding's verification).

Greedy (Leviathan et al. 2023): keep drafted tokens while the fused argmax equals them;
at the first mismatch the fused argmax is the next token. Sampled (Leviathan et al. 2023;
Chen et al. 2023): keep drafted x, drawn from the drafter's distribution q, with
probability min(1, p(x)/q(x)), p the fused distribution; on rejection draw from
normalise(max(0, p - q)); after the last drafted token draw from p. Each kept token is then
distributed exactly as a token drawn from p. A deterministic proposal x (another member's
greedy draft, cross_drafts.py) is the case q = a point mass on x: kept with probability
p(x), else drawn from p without x, renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import Sampler


def accept_draft(
    sampler: Sampler,
    fused: torch.Tensor,
    drafted: Sequence[int],
    q: Sequence[torch.Tensor | None],
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens kept at the verified positions: fused (P, V) logits after 0..P-1 drafted
    tokens, `drafted` the drafted ids (P-1 or P of them), `q[t]` the (V,) distribution
    drafted token t was drawn from, None for a point mass on it (sampled only), `generator`
    the row's stream on the fused logits' device. The last token is the fused choice at
    the first mismatch, or at the position after the draft; a fully kept draft with no
    position after it ends there.
    """
    kept: list[int] = []
    for t in range(fused.shape[0]):
        guess = drafted[t] if t < len(drafted) else None
        if sampler.greedy:
            token = int(fused[t].argmax())
        else:
            p = sampler.probs(fused[t][None])[0]  # (V,)
            if guess is None:
                token = int(torch.multinomial(p, 1, generator=generator))
            else:
                q_t = q[t]
                u = float(torch.rand(1, generator=generator, device=p.device))
                q_x = 1.0 if q_t is None else float(q_t[guess])
                if u * q_x < float(p[guess]):
                    token = guess  # kept with probability min(1, p/q)
                else:
                    if q_t is None:  # p without the proposal: max(0, p - point mass)
                        rest = p.clone()
                        rest[guess] = 0
                    else:
                        rest = (p - q_t.to(p.device)).clamp(min=0)  # normalise(max(0, p - q))
                    rest = rest if float(rest.sum()) > 0 else p
                    token = int(torch.multinomial(rest / rest.sum(), 1, generator=generator))
        kept.append(token)
        if token != guess:
            break
    return kept
