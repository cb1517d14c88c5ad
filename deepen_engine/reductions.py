"""Reductions over a vocabulary's logits on the CPU: top-k and argmax read in blocks, and
the softmax's log normaliser through `exp2`.

`torch.topk` and `torch.argmax` on a CPU row of 262k logits (Gemma-3's vocabulary) cost
0.5-0.9 ms a row, 10-20 times a row's `amax`: they carry an index through the whole pass
(topk also copies the row into (value, index) pairs). Here the row is read once by a
blockwise `amax`; only the blocks whose maximum can hold a winner are read again.

- `top_k`: the k largest of a row lie in the k blocks with the largest maxima (each of
  them is at most its block's maximum, so fewer than k blocks beat its block). The same
  values and ids as `torch.topk`, largest first; only among equal values may another of
  them be picked or come first, as `torch.topk` itself does not promise which.
- `argmax`: the first block holding the row's maximum, then the first position of the
  maximum in that block: the same id as `torch.argmax` (its first maximal value), NaN
  included (both treat NaN as the maximum).

Small rows, rows that are not whole blocks and other devices use torch's own operations
(on a GPU each is one kernel).

`log_normaliser` and `exp_`: on this CPU build `torch.exp` costs about 3x `torch.exp2` per
element (1.3 against 0.4 ms for 8 x 262k float32 logits), so `e^x` is taken as
`2^(x log2 e)`: `torch.logsumexp` over Gemma-3's 8 x 262k logits takes 1.9-2.0 ms, the
same normaliser through `exp2` 1.0 ms, and `exp` of 8 x 46k logits 0.23 against 0.12 ms
(`python scripts/fusion_cost.py passes steps.pt`). They differ from torch's in the last
bits only (the product's rounding).
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)

BLOCK = 64
"""Logits per block (measured on the default pair: 64 beat 32, 128 and 256 at batch 1
and 8; `python scripts/fusion_cost.py reductions steps.pt`)."""


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """The rows of x (B, V) as (B, V / BLOCK, BLOCK)."""
    return x.reshape(x.shape[0], -1, BLOCK)


MIN_LOGITS = 1 << 17
"""Fewer logits than this in all rows together are read by torch's own operations: below,
the blocks' few extra operations cost more than they save (SmolLM2's 49k at batch 1)."""


def _blocked(x: torch.Tensor, k: int) -> bool:
    """Whether to read x in blocks: a 2-D CPU tensor of whole blocks (vocabularies are
    padded to multiples of 64), with many more blocks than k, where it pays.
    """
    vocab = x.shape[-1]
    return (
        x.dim() == 2
        and x.device.type == "cpu"
        and vocab % BLOCK == 0
        and vocab >= 8 * k * BLOCK
        and x.numel() >= MIN_LOGITS
    )


def block_maxima(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """(B, V / BLOCK) the largest value of each block of x (B, V), where `top_k(x, k)`
    reads x in blocks; else None. One pass that serves several readers of the same
    logits: `top_k(x, k, maxima)` and each row's maximum for `log_normaliser(x, top)`.
    """
    return _blocks(x).amax(-1) if _blocked(x, k) else None


def top_k(
    x: torch.Tensor, k: int, maxima: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of x (B, V) and their ids, largest first, as
    `x.topk(k, dim=-1)` (see the module docstring for ties). k must be at most V.
    `maxima`: x's `block_maxima`, when the caller has them (the pass is not repeated).
    """
    if not _blocked(x, k):
        return x.topk(k, dim=-1)
    batch = x.shape[0]
    blocks = _blocks(x)  # (B, nb, BLOCK)
    if maxima is None:
        maxima = blocks.amax(-1)  # (B, nb)
    best_blocks = maxima.topk(k, dim=-1).indices  # (B, k)
    rows = torch.arange(batch, device=x.device)[:, None]
    values = blocks[rows, best_blocks].reshape(batch, k * BLOCK)  # (B, k * BLOCK)
    top, where = values.topk(k, dim=-1)
    ids = best_blocks.gather(1, where // BLOCK) * BLOCK + where % BLOCK
    return top, ids


def argmax(x: torch.Tensor) -> torch.Tensor:
    """(B,) the id of each row's largest value, the first one where several are equal, as
    `x.argmax(-1)` for x (B, V).
    """
    if not _blocked(x, 1):
        return x.argmax(-1)
    blocks = _blocks(x)  # (B, nb, BLOCK)
    block = blocks.amax(-1).argmax(-1)  # (B,) the first block holding the maximum
    rows = torch.arange(x.shape[0], device=x.device)
    return block * BLOCK + blocks[rows, block].argmax(-1)


def exp_(x: torch.Tensor) -> torch.Tensor:
    """`x.exp_()` through `exp2` on the CPU (see the module docstring); x is overwritten."""
    if x.device.type != "cpu":
        return x.exp_()
    return x.mul_(LOG2E).exp2_()


def log_normaliser(x: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1) `x.logsumexp(-1, keepdim=True)` of x (B, V): the log of each row's softmax
    normaliser, with one `exp2` pass on the CPU (see the module docstring). Rows of -inf
    give -inf, a +inf logit +inf and NaN NaN, as torch's. Anything else with a
    `logsumexp` (a remote helper's `TopLogits`, which carries its normaliser) gives that.
    `top`: each row's maximum (B, 1), when the caller has it (`block_maxima`).
    """
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return x.logsumexp(-1, keepdim=True)
    if top is None:
        top = x.amax(-1, keepdim=True)
    top = torch.where(top.isinf(), 0.0, top)  # as torch: -inf rows sum to 0, +inf stays
    # (x - top) log2(e) written in one pass as x log2(e) - top log2(e): three passes over
    # the rows in all (this, exp2, sum), where a subtraction and a product took two
    shifted = torch.add(top * -LOG2E, x, alpha=LOG2E)
    return shifted.exp2_().sum(-1, keepdim=True).log_().add_(top)
