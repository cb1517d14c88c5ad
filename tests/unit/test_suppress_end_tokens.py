"""`suppress_end_tokens`: end tokens at -inf in the rows below their `min_new_tokens`,
every other logit unchanged, and the input never written."""

from __future__ import annotations

import pytest
import torch

from deepen_engine.decoding.sampling import suppress_end_tokens


@pytest.mark.parametrize(
    "rows", [[True, True, True], [False, True, False], [True, False, True], [False, False, False]]
)
def test_end_tokens_masked_in_the_named_rows_only(rows: list[bool]) -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    end_ids = torch.tensor([2, 7])
    out = suppress_end_tokens(logits, end_ids, torch.tensor(rows))
    expected = before.clone()
    for b, early in enumerate(rows):
        if early:
            expected[b, 2] = expected[b, 7] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(logits, before)  # the caller's logits (maybe a member's) untouched


def test_no_end_ids_returns_the_logits() -> None:
    logits = torch.zeros(2, 4)
    out = suppress_end_tokens(
        logits, torch.tensor([], dtype=torch.long), torch.tensor([True, True])
    )
    assert out is logits
