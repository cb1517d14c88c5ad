"""A float32 member's body with the weights of its linear layers in bfloat16, for drafting
only (speculative decoding, decoding/main_drafts.py).

A draft only proposes tokens: verification reads the member's own float32 logits at every
drafted position, from one forward of its float32 body over them, and the positions the
drafts fed are rolled back first (`MemberBatch.draft_body`). So drafting in lower precision
changes no output, only how often drafts are kept. On the CPU measured (AVX-512 with
bfloat16 instructions) a bfloat16 product reads half the bytes of a float32 one, and a
draft forward at one position is memory-bound; Gemma-3-270m's draft forward (body and
shortlist) took 19.0 ms against 39.5 (`scripts/draft_precision.py`). Activations stay
float32 (each product's input is rounded to bfloat16 and its output widened back), so the
KV cache and the attention are the model's own.

The copy shares every parameter and buffer of the body except the linear layers' weights,
which it holds once more in bfloat16 (half the body's float32 bytes).
"""

from __future__ import annotations

import copy
import itertools

import torch


class Bfloat16Linear(torch.nn.Module):
    """`nn.Linear` with its weight copied to bfloat16; inputs and outputs keep their dtype."""

    weight: torch.Tensor

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16), persistent=False)
        self.bias = linear.bias  # shared, float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ weight.T + bias`, the product in bfloat16, in `x`'s dtype."""
        out = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


def bfloat16_supported(device: torch.device) -> bool:
    """Whether bfloat16 products are native on `device` (on the CPU: oneDNN's check for
    AVX-512 bfloat16 or AMX instructions; elsewhere they are emulated and slower).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # a private check of torch's CPU build; a build without it: not native
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def bfloat16_body(body: torch.nn.Module) -> torch.nn.Module:
    """A copy of `body` sharing its parameters and buffers, with every float32 `nn.Linear`
    replaced by a `Bfloat16Linear` of it (module docstring).
    """
    shared = {id(t): t for t in itertools.chain(body.parameters(), body.buffers())}
    draft = copy.deepcopy(body, shared)  # the module tree again; tensors not copied
    for module in list(draft.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, Bfloat16Linear(child))
    return draft
