"""What crosses between the decoding loop and a member that runs in another process (a
Ray actor, remote/backend.py), once per step.

The coordinator keeps every row's ids (it holds the member's tokenizer, so helpers sync
their text here, exactly as in process); the actor keeps the KV cache and runs the
forward passes. One call per step and member, `MemberActor.step(StepRequest)`:

- in, `StepRequest`: the batch operations since the last call (`Open`, `KeepRows`,
  `Merge`, `TakeRows`, `Free`), then one `EditIds` per row whose ids changed: the ids it keeps and
  the new ids after them (the main member: the chosen token; a helper: its re-tokenised
  tail, usually one id), and which batch to run. A batch whose prefill scores its prompts
  (decoding/prompt_scores.py) says so in its `Open`: each row's span to score;
- out, `StepReply`: what fusion reads of the member's next-token logits, and each row's
  fed positions: the member's full (B, V) float32 logits, 4V bytes a row, or for a fusion
  method that reads only each row's top-K of a helper (`Fuser.logits_needed`), its top-K
  token ids and logits and its log normaliser (`logsumexp` over the whole vocabulary),
  `TopLogits`: 8K + 4 bytes a row. The main member always sends everything: its fused
  distribution is its logits with the candidates' entries changed, and sampling, top-p and
  logprobs read all of it. None of today's methods reads only a top-K of a helper (DeePEn's
  fast path reads every anchor token's probability), so today every member sends all.
  A scoring batch's reply also holds each row's prompt score sums (`ScoreSums`, 24 bytes
  a row), so the coordinator's `RowScore.bits_per_byte` is exactly the actor's.

Helpers' `TopLogits` give fusion exactly the numbers it computes from the full tensor:
the same top-K values and ids (one `topk` on the same tensor) and the same normaliser
(one `logsumexp` on it), so outputs equal in-process members token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

INT_BYTES = 8  # a Python int in a request, counted as an int64


ScoreSums = tuple[float, int, int]
"""A row's prompt score as it crosses: `RowScore`'s `nll` (nats), `bytes` and `tokens`."""


@dataclass
class Open:
    """Start a batch with these rows' prompt ids (not yet fed). `spans`: when the batch's
    prefill scores the prompts, each row's `RowScore.span` ("whole" or "second-half");
    None when it does not score.
    """

    batch: int
    prompt_ids: list[list[int]]
    spans: list[str] | None = None


@dataclass
class KeepRows:
    """Keep only these rows of a batch, in this order."""

    batch: int
    rows: list[int]


@dataclass
class Merge:
    """Append the rows of batch `other` (prefilled) to `batch`; `other` is gone after."""

    batch: int
    other: int


@dataclass
class TakeRows:
    """Copy rows of `batch` (prefilled) out, row `rows[j]` into a new batch `into[j]` of
    its own (`MemberBatch.take_row`); `batch` is unchanged.
    """

    batch: int
    rows: list[int]
    into: list[int]


@dataclass
class Free:
    """Drop a batch: its KV cache and rows."""

    batch: int


@dataclass
class EditIds:
    """Row `row` of `batch` now holds its first `keep` ids followed by `tail`; cached
    positions past `keep` are stale (rolled back).
    """

    batch: int
    row: int
    keep: int
    tail: list[int]


Op = Open | KeepRows | Merge | TakeRows | Free | EditIds


@dataclass
class StepRequest:
    """One step's call: apply `ops` in order, feed batch `forward` what its cache lacks,
    and answer with what fusion reads: the top `top_k` logits of each row, or all of them
    (`top_k=None`).
    """

    ops: list[Op]
    forward: int
    top_k: int | None

    def payload_bytes(self) -> int:
        """Bytes of ids and numbers in this request (ints counted as int64, no framing)."""
        total = 2 * INT_BYTES
        for op in self.ops:
            if isinstance(op, Open):
                total += INT_BYTES * (1 + sum(len(p) + 1 for p in op.prompt_ids))
                total += sum(len(s) for s in op.spans or [])  # ASCII names, a byte each
            elif isinstance(op, KeepRows):
                total += INT_BYTES * (1 + len(op.rows))
            elif isinstance(op, EditIds):
                total += INT_BYTES * (3 + len(op.tail))
            elif isinstance(op, TakeRows):
                total += INT_BYTES * (1 + 2 * len(op.rows))
            else:
                total += INT_BYTES * 2
        return total


@dataclass
class StepReply:
    """The actor's answer to a `StepRequest`.

    Exactly one of `logits` (the full (B, V) float32 logits) and `top_ids`/`top_values`/
    `log_normaliser` ((B, K) int32, (B, K) float32, (B,) float32) is set, unless the batch
    has no logits yet. `scores` holds each row's prompt score sums when the batch scores
    its prompts (None otherwise). `error` is set instead when the member failed.
    """

    fed_positions: list[int] = field(default_factory=list)
    forward_seconds: float = 0.0  # the actor's own time in the forward pass
    scores: list[ScoreSums] | None = None
    logits: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_values: np.ndarray | None = None
    log_normaliser: np.ndarray | None = None
    error: str | None = None

    def payload_bytes(self) -> int:
        """Bytes of arrays and numbers in this reply (ints as int64, no framing)."""
        arrays = (self.logits, self.top_ids, self.top_values, self.log_normaliser)
        total = sum(a.nbytes for a in arrays if a is not None)
        total += 3 * INT_BYTES * len(self.scores or [])  # a float64 and two ints a row
        return total + INT_BYTES * (len(self.fed_positions) + 1)

    @classmethod
    def of_logits(
        cls, logits: torch.Tensor | None, top_k: int | None, fed: list[int], seconds: float
    ) -> StepReply:
        """The reply for a batch's (B, V) float32 logits: all of them, or the top `top_k`
        of each row and its normaliser. The logits may be on the member's GPU: the top-k
        and normaliser are computed there, and only what is sent crosses to the CPU.
        """
        reply = cls(fed_positions=fed, forward_seconds=seconds)
        if logits is None:
            return reply
        if top_k is None:
            reply.logits = logits.cpu().numpy()
            return reply
        values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, K)
        reply.top_ids = ids.to(torch.int32).cpu().numpy()
        reply.top_values = values.cpu().numpy()
        reply.log_normaliser = logits.logsumexp(-1).cpu().numpy()  # (B,)
        return reply

    def member_logits(self, vocab_size: int) -> torch.Tensor | TopLogits | None:
        """The logits as the loop reads them: a (B, V) tensor, or `TopLogits`."""
        if self.logits is not None:
            return torch.from_numpy(np.array(self.logits))  # a writable copy
        if self.top_ids is None or self.top_values is None or self.log_normaliser is None:
            return None
        return TopLogits(
            ids=torch.from_numpy(self.top_ids.astype(np.int64)),
            values=torch.from_numpy(np.array(self.top_values)),
            log_normaliser=torch.from_numpy(np.array(self.log_normaliser))[:, None],
            vocab_size=vocab_size,
        )


class TopLogits:
    """A helper's next-token logits as fusion reads them: each row's top-K token ids and
    logits, best first, and its log normaliser (`logsumexp` over the whole vocabulary).

    It stands in for the (B, V) tensor in `Fuser.fuse`, which reads only `shape`,
    `float()`, `topk(k)` and `logsumexp(-1)` of a helper's logits, and the loop, which
    selects rows: each gives what the full tensor gives, bit for bit. Anything else is
    missing on purpose (AttributeError), so a fusion method that reads more of a helper
    fails loudly instead of fusing a truncated distribution; such a method asks for full
    logits (see `Fuser.logits_needed`).
    """

    def __init__(
        self,
        ids: torch.Tensor,  # (B, K) int64
        values: torch.Tensor,  # (B, K) float32, descending per row
        log_normaliser: torch.Tensor,  # (B, 1) float32
        vocab_size: int,
        widths: torch.Tensor | None = None,  # (B,) how many of each row's K are real
    ) -> None:
        self.ids = ids
        self.values = values
        self.log_normaliser = log_normaliser
        self.vocab_size = vocab_size
        width = ids.shape[1]
        self.widths = widths if widths is not None else torch.full((ids.shape[0],), width)

    @property
    def device(self) -> torch.device:
        """Where the parts are (the CPU: they came from another process)."""
        return self.ids.device

    @property
    def shape(self) -> torch.Size:
        """(B, V), as the full tensor."""
        return torch.Size([self.ids.shape[0], self.vocab_size])

    def float(self) -> TopLogits:
        """Already float32."""
        return self

    def topk(self, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) of each row's k largest logits, best first."""
        if dim not in (-1, 1):
            raise ValueError(f"TopLogits.topk works on the vocabulary (dim=-1), got dim={dim}")
        if self.ids.shape[0] and k > int(self.widths.min()):
            raise RuntimeError(
                f"fusion asked for the top {k} logits, but the member sent only the top "
                f"{int(self.widths.min())}: the loop must ask every member for the widest "
                "top-k its rows' fusion settings read (Fuser.logits_needed)"
            )
        return self.values[:, :k], self.ids[:, :k]

    def logsumexp(self, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
        """Each row's log normaliser over the whole vocabulary: (B, 1), or (B,)."""
        if dim not in (-1, 1):
            raise ValueError(f"TopLogits.logsumexp works on dim=-1, got dim={dim}")
        return self.log_normaliser if keepdim else self.log_normaliser[:, 0]

    def __getitem__(self, index: Any) -> TopLogits:
        """Rows `index` (a row index tensor or list), as `tensor[index]`."""
        return TopLogits(
            self.ids[index],
            self.values[index],
            self.log_normaliser[index],
            self.vocab_size,
            self.widths[index],
        )

    @classmethod
    def cat(cls, parts: Sequence[TopLogits]) -> TopLogits:
        """The rows of all parts, in order; narrower parts are padded on the right (those
        slots are never read: `widths` says how many of each row's are real).
        """
        width = max(p.ids.shape[1] for p in parts)
        ids, values = [], []
        for p in parts:
            missing = width - p.ids.shape[1]
            ids.append(torch.nn.functional.pad(p.ids, (0, missing)))
            values.append(torch.nn.functional.pad(p.values, (0, missing), value=-torch.inf))
        return cls(
            torch.cat(ids),
            torch.cat(values),
            torch.cat([p.log_normaliser for p in parts]),
            parts[0].vocab_size,
            torch.cat([p.widths for p in parts]),
        )
