"""Tensor helpers of the members' batched KV caches: left padding to a common width, and
gathering cache slots when rows are compacted.
"""

from __future__ import annotations

import torch


def left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """States (B, H, T, D) -> (B, H, width, D), zeros on the left."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    pad = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([pad, states], dim=2)


def left_pad_mask(valid: torch.Tensor, width: int) -> torch.Tensor:
    """Mask (B, T) -> (B, width), False on the left."""
    missing = width - valid.shape[1]
    if missing == 0:
        return valid
    return torch.cat([valid.new_zeros(valid.shape[0], missing), valid], dim=1)


def gather_slots(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """States (B, H, T, D), index (B, T') -> (B, H, T', D)."""
    heads, dim = states.shape[1], states.shape[3]
    return states.gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
