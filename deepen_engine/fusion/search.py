"""The inverse search's optimiser, as the DeePEn reference implementation runs it: AdamW
(weight decay 0.01, torch's default betas and eps) on the main member's candidate logits,
with a cosine-annealed learning rate. Shared by the fast path (`deepen.py`) and the
full-vocabulary reference (`reference.py`), which supply the gradient of the KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import FusionConfig

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, as the reference
ADAM_EPS = 1e-8
Q_FLOOR = 1e-12
"""Anchors whose mass under the candidates is at most this carry no gradient (the
candidates cannot reach them)."""


def adamw_search(
    z: torch.Tensor,
    valid: torch.Tensor,
    gradient_of_s: Callable[[torch.Tensor], torch.Tensor],
    cfg: FusionConfig,
) -> torch.Tensor:
    """The inverse search's optimiser, as the reference: `cfg.steps` AdamW steps on the
    logits z (B, M) with a cosine-annealed rate, given dL/ds for s = softmax(z) over the
    `valid` entries (padding masked out).
    """
    z = z.clone()
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    invalid = ~valid
    b1, b2 = ADAM_BETAS
    eta_min = cfg.eta * cfg.eta_min_ratio
    for t in range(cfg.steps):
        cosine = (1 + math.cos(math.pi * t / cfg.schedule_t_max)) / 2
        lr = eta_min + (cfg.eta - eta_min) * cosine
        s = torch.softmax(z.masked_fill(invalid, float("-inf")), dim=-1)  # (B, M)
        u = gradient_of_s(s)  # (B, M) dL/ds
        grad = s * (u - (s * u).sum(-1, keepdim=True))  # dL/dz through the softmax
        # AdamW step (decoupled weight decay) in place, the operations of torch.optim.AdamW
        # on one tensor (a handful of small tensors: each operation saved is time saved)
        step = t + 1
        z.mul_(1 - lr * cfg.weight_decay)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = v.sqrt().div_(math.sqrt(1 - b2**step)).add_(ADAM_EPS)
        z.addcdiv_(m, denom, value=-lr / (1 - b1**step))
    return z
