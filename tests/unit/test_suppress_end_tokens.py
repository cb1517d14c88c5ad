"""`suppress_end_tokens`: end tokens at -inf in the rows below their `min_new_tokens`,
every other logit unchanged, and the input written only when the caller owns it."""

from __future__ import annotations

import pytest
import torch

from deepen_engine.decoding.sampling import shares_memory, suppress_end_tokens


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


@pytest.mark.parametrize("rows", [[True, True], [False, True]])
def test_in_place_writes_the_callers_logits_with_the_same_result(rows: list[bool]) -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    end_ids, early = torch.tensor([3, 5]), torch.tensor(rows)
    copied = suppress_end_tokens(logits, end_ids, early)
    out = suppress_end_tokens(logits, end_ids, early, in_place=True)
    assert out is logits
    assert torch.equal(out, copied)


def test_fused_logits_sharing_a_members_memory_are_not_owned() -> None:
    main, helper = torch.zeros(2, 8), torch.zeros(2, 5)
    assert shares_memory(main, [main, helper])  # fusion returned the main member's logits
    assert shares_memory(main[1:], [main, helper])  # a view of them
    assert not shares_memory(main.clone(), [main, helper])
    assert not shares_memory(main.clone(), [object(), helper])  # a remote member's reply
