"""A member's output layer, applied by the engine rather than inside the model's forward,
for shortlist drafting (decoding/main_drafts.py, docs/speculative.md): the main member
drafts from its output layer restricted to some rows (`OutputLayer.shortlist`), keeping
its hidden states, and the full layer runs once over the hidden states of every drafted
position when they are verified. The products are the few-row form of members/few_rows.py.

Only model classes whose forward is exactly "body, last positions, `lm_head`, optional
final logit soft-capping" (`SUPPORTED`) get one, and only with a plain float `nn.Linear`
head without bias, in one process, without accelerate's hooks; every other member runs its
own forward as before. tests/unit/test_output_layer.py checks each supported class against its
forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .draft_body import bfloat16_body, bfloat16_supported
from .few_rows import product

# Causal LMs whose forward is `self.model(...)`, `slice_logits_to_keep`, `self.lm_head`, then
# `final_logit_softcapping` where the config sets it (transformers 5.x).
SUPPORTED = frozenset(
    {
        "LlamaForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "Phi3ForCausalLM",
        "Olmo2ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)


@dataclass
class OutputLayer:
    """A model's body and its output layer (see the module docstring)."""

    body: torch.nn.Module  # the model without its output layer
    weight: torch.Tensor  # (V, d) the output layer's weight
    softcap: float | None  # `final_logit_softcapping`, or None
    # draft shortlists built so far, by the other members' names and the drafts' dtype
    # (decoding/main_drafts.py)
    shortlists: dict[tuple[tuple[str, ...], torch.dtype], ShortlistHead | None] = field(
        default_factory=dict, repr=False
    )
    # the body with bfloat16 linear layers, for drafts (draft_body.py), once built
    low_precision: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: Any, device_map: dict[str, Any] | None = None) -> OutputLayer | None:
        """The model's output layer, or None where the engine must run its forward whole."""
        if type(model).__name__ not in SUPPORTED or device_map:
            return None
        head = model.get_output_embeddings()
        body = getattr(model, "model", None)
        if type(head) is not torch.nn.Linear or head.bias is not None or body is None:
            return None  # a quantized or biased head: the model applies it itself
        if hasattr(head, "_hf_hook") or not head.weight.dtype.is_floating_point:
            return None
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return cls(body=body, weight=head.weight, softcap=float(softcap) if softcap else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) logits of (..., d) hidden states, as the model's forward computes them."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.cap(product(flat, self.weight)).reshape(*hidden.shape[:-1], -1)

    def shortlist(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> ShortlistHead:
        """The layer restricted to the output rows `rows` (their weights copied once, in
        `dtype` where given).
        """
        rows = rows.to(self.weight.device)
        kept = torch.zeros(self.weight.shape[0], dtype=torch.bool)
        kept[rows.cpu()] = True
        weight = self.weight.detach()[rows].to(dtype or self.weight.dtype).contiguous()
        return ShortlistHead(self, rows, weight, kept)

    def draft_body(self, precision: str) -> torch.nn.Module | None:
        """The body for drafts at `precision` (`SchedulerConfig.draft_precision`): with
        bfloat16 linear layers (draft_body.py, built on first use), or None for the body
        itself: at "float32", for weights that are not float32, and at "auto" where
        bfloat16 products are not native here.
        """
        weight = self.weight
        if precision == "float32" or weight.dtype != torch.float32:
            return None
        if precision == "auto" and not bfloat16_supported(weight.device):
            return None
        if self.low_precision is None:
            self.low_precision = bfloat16_body(self.body)
        return self.low_precision

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """`final_logit_softcapping` applied as the model applies it (none: unchanged)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


@dataclass
class ShortlistHead:
    """An output layer restricted to some of its rows (shortlist drafting), plus, per
    hidden state, any rows of the full layer asked for (`missing`: a row's own tokens).
    """

    layer: OutputLayer
    rows: torch.Tensor  # (S,) token ids kept
    weight: torch.Tensor  # (S, d) their rows of the output layer
    kept: torch.Tensor  # (V,) bool on the CPU: whether a token id is among `rows`

    def missing(self, ids: list[int]) -> torch.Tensor:
        """The distinct token ids among `ids` that the shortlist lacks (ascending)."""
        if not ids:
            return torch.zeros(0, dtype=torch.long)
        given = torch.tensor(ids, dtype=torch.long)
        return torch.unique(given[~self.kept[given]])

    def logits(
        self, hidden: torch.Tensor, extras: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(N, V) float32 logits of (N, d) hidden states: the shortlisted tokens' logits as
        the full layer computes them (up to float rounding), and for hidden state n also
        the tokens `extras[n]`; -inf for every other token.
        """
        out = self.layer.cap(product(hidden.to(self.weight.dtype), self.weight).float())
        full = torch.full(
            (hidden.shape[0], self.layer.weight.shape[0]), float("-inf"), device=out.device
        )
        full[:, self.rows] = out  # (N, S)
        for n, ids in enumerate(extras or []):
            if len(ids):  # a few hundred rows at most: a gather and one small product
                ids = ids.to(full.device)
                rows = self.layer.weight.detach()[ids]  # (E, d)
                full[n, ids] = self.layer.cap(hidden[n] @ rows.T).float()
        return full
