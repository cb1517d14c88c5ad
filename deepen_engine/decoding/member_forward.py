"""One forward pass of a member over a batch (`MemberBatch._forward_once` builds the inputs):
through the engine's own output layer where the member has one (members/output_layer.py),
else the model's forward; on the CPU with few-row linear layers computed the faster way
round (members/few_rows.py). A failure becomes a `MemberError` naming the member.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import MemberError
from ..members import Member
from ..members.few_rows import FEW_ROWS, few_row_products
from ..members.output_layer import ShortlistHead


def member_forward(
    member: Member,
    cache: Any,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    keep: int,
    shortlist: ShortlistHead | None = None,
    extras: list[torch.Tensor] | None = None,
    body: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, keep, V) logits of the last `keep` positions of one forward over `inputs` (ids,
    attention mask, position ids: (B, W) each, on the CPU), and the (B, d) hidden states
    after the last position when `shortlist` is given (its logits then cover only the
    shortlisted tokens and, per row, `extras[b]`, -inf elsewhere; `keep` must be 1), else
    None. `body` (a draft body, members/draft_body.py) runs in place of the member's.
    """
    input_ids, mask, positions = inputs
    device = member.device
    kwargs = {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.long().to(device),
        "position_ids": positions.to(device),
        "use_cache": True,
        member.cache_argument: cache,
    }
    layer = member.output_layer
    # only where some linear layer can be rerouted: one row, or more than FEW_ROWS, would
    # pay the mode's per-call cost for nothing
    few = device.type == "cpu" and 1 < input_ids.numel() <= FEW_ROWS
    rerouted = few_row_products() if few else contextlib.nullcontext()
    try:
        # not inference_mode: caches are edited in place later
        with torch.no_grad(), rerouted:
            if layer is None:
                return member.model(**kwargs, logits_to_keep=keep).logits, None
            hidden = (body or layer.body)(**kwargs).last_hidden_state  # (B, W, d)
            if shortlist is not None:
                last = hidden[:, -1, :]
                return shortlist.logits(last, extras)[:, None, :], last
            return layer.logits(hidden[:, -keep:, :]), None
    except Exception as exc:
        # The cache may hold half a step now: the whole request is abandoned (the decoding
        # loop frees every batch), so the error only has to say who failed.
        name = member.name
        raise MemberError(
            name,
            f"Member {name!r} failed in its forward pass ({type(exc).__name__}: {exc}); "
            f"the request was abandoned and the ensemble stays usable. Check that "
            f"{name!r} runs on its own (device, dtype, memory).",
        ) from exc
