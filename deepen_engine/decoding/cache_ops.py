"""Tensor helpers of the members' batched KV caches: left padding to a common width,
gathering cache slots when rows are compacted, dropping slots no row uses, their bytes.
"""

from __future__ import annotations

from typing import Any

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


def drop_unused_leading_slots(cache: Any, valid: torch.Tensor) -> torch.Tensor:
    """Cut the cache's first slots while no row uses them; returns the (B, T') mask.

    cache: a transformers cache whose layers hold (B, H, T, D) states; valid: its (B, T)
    mask. The slots cut are masked for every row, so no row's attention changes, and
    position ids count valid slots only, so none moves.
    """
    used = valid.any(dim=0)  # (T,)
    if not bool(used.any()) or bool(used[0]):
        return valid
    first = int(used.float().argmax())
    for layer in cache.layers:  # each on its own device in a sharded member
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys[:, :, first:, :]
        layer.values = layer.values[:, :, first:, :]
        if hasattr(layer, "cumulative_length"):  # a sliding layer counts the slots it saw
            layer.cumulative_length = layer.keys.shape[2]
    return valid[:, first:]


def cache_bytes(cache: Any) -> int:
    """Bytes of the key and value states a transformers cache holds now."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for states in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(states, torch.Tensor):
                total += states.numel() * states.element_size()
    return total


def holes(valid: torch.Tensor) -> int:
    """Masked slots of a (B, T) cache mask after each row's first valid slot (left padding
    does not count).
    """
    total = valid.shape[1]
    if total == 0:
        return 0
    first = valid.float().argmax(dim=1, keepdim=True)  # (B, 1)
    return int(((~valid) & (torch.arange(total)[None, :] >= first)).sum())


def compact(cache: Any, valid: torch.Tensor) -> torch.Tensor:
    """Gather each row's valid slots to the right end of a shorter cache, in place; the
    new (B, T') mask.
    """
    counts = valid.sum(dim=1)
    length = int(counts.max())
    rows = valid.shape[0]
    index = torch.zeros(rows, length, dtype=torch.long)
    out = torch.zeros(rows, length, dtype=torch.bool)
    for b in range(rows):
        slots = valid[b].nonzero().squeeze(1)
        index[b, length - len(slots) :] = slots
        out[b, length - len(slots) :] = True
    for layer in cache.layers:  # each on its own device in a sharded member
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = gather_slots(layer.keys, index.to(layer.keys.device))
        layer.values = gather_slots(layer.values, index.to(layer.values.device))
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length
    return out
