"""Keeping every member's token ids and KV cache in step with the shared text.

The main member appends the token it chose. Every other member ("helper") is told the
generated text; its ids must equal its own tokenisation of `prompt + text`, which can
change earlier tokens (merges across the boundary). A helper therefore compares its new
ids with the old ones, rolls its KV cache back to the first difference and feeds only the
ids from there on.

Cost note (this release): a helper re-tokenises its whole generated text at each step.
That is tokenizer work (microseconds per token, Rust), not model work: the model still
feeds only the changed positions. A tail-window re-tokenisation comes with batching.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import DynamicCache

from .members import Member


class MemberState:
    """One member's ids, KV cache and latest next-token logits, for one sequence."""

    def __init__(self, member: Member, prompt_ids: list[int]) -> None:
        self.member = member
        self.prompt_ids = list(prompt_ids)
        self.ids = list(prompt_ids)  # prompt + generated, in this member's tokens
        # A cache built without the model config keeps full layers even for sliding-window
        # models (the model still masks by the window), so it can always be cropped.
        self.cache: Any = DynamicCache()
        self.cached = 0  # positions held in the cache
        self.fed_positions = 0  # positions fed after the prompt (sync cost counter)
        self.forward_seconds = 0.0
        self.logits: torch.Tensor | None = None  # (1, V) logits after the last id

    @property
    def generated_ids(self) -> list[int]:
        """Ids after the prompt."""
        return self.ids[len(self.prompt_ids) :]

    def append(self, token_id: int) -> None:
        """Main member: append the chosen token."""
        self.ids.append(token_id)

    def sync_text(self, text: str) -> None:
        """Helper member: make the ids equal the tokenisation of prompt + `text`."""
        tail = self.member.tokenizer(text, add_special_tokens=False).input_ids if text else []
        target = self.prompt_ids + list(tail)
        keep = _common_prefix(self.ids, target)
        if keep == len(target) and keep < len(self.ids):
            keep -= 1  # a shorter tokenisation: re-feed its last id to get fresh logits
        self.ids = target
        if keep < self.cached:
            self.cache.crop(keep - self.cached)  # negative: drop the stale positions
            self.cached = keep
            self.logits = None

    def forward(self) -> None:
        """Feed the ids the cache lacks; keep the logits after the last one."""
        pending = self.ids[self.cached :]
        if not pending:
            return
        start = time.perf_counter()
        input_ids = torch.tensor([pending], dtype=torch.long, device=self.member.device)
        with torch.inference_mode():
            out = self.member.model(
                input_ids=input_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self.member.cache_argument: self.cache},
            )
        self.logits = out.logits[:, -1, :].float().cpu()  # (1, V)
        if self.cached >= len(self.prompt_ids):
            self.fed_positions += len(pending)
        else:
            self.fed_positions += max(0, len(self.ids) - len(self.prompt_ids))
        self.cached = len(self.ids)
        self.forward_seconds += time.perf_counter() - start

    def free(self) -> None:
        """Drop the KV cache."""
        self.cache = DynamicCache()
        self.cached = 0
        self.logits = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
