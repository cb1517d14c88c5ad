"""Few-row linear layers computed the other way round on the CPU (members/few_rows.py): the
same values as `linear`, only where it applies, and the same member logits."""

from __future__ import annotations

import threading

import pytest
import torch

from deepen_engine.members import few_rows
from deepen_engine.members.few_rows import FEW_ROWS, few_row_products, product
from tests.conftest import tiny_gemma3


@pytest.mark.parametrize("rows", [2, 5, FEW_ROWS])
def test_rerouted_linear_equals_linear(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 300)
    x = torch.randn(1, rows, 48)
    with torch.no_grad():
        want = layer(x)
        with few_row_products():
            got = layer(x)
    assert got.shape == want.shape == (1, rows, 300) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert few_rows._rerouted((x, layer.weight, layer.bias), {}) is not None
    torch.testing.assert_close(product(x[0], layer.weight), want[0] - layer.bias)


def test_calls_left_alone():
    weight = torch.randn(30, 8)
    alone = [
        (torch.randn(1, 8), weight),  # one row: linear is as fast
        (torch.randn(FEW_ROWS + 1, 8), weight),  # many rows
        (torch.randn(4, 8, dtype=torch.float64), weight),  # dtypes differ
        (torch.randn(4, 8).requires_grad_(), weight),  # autograd
        (torch.randn(4, 8), weight.half()),  # a half-precision layer on float rows
    ]
    for x, w in alone:
        assert few_rows._rerouted((x, w), {}) is None
    assert few_rows._rerouted((), {"input": torch.randn(3, 8), "weight": weight}) is not None


def test_member_logits_are_the_same_and_the_mode_is_per_thread():
    model = tiny_gemma3(300)
    ids = torch.tensor([[5, 17, 42, 8], [7, 7, 250, 1]])
    seen: list[int] = []
    original = few_rows._rerouted

    def counted(args, kwargs):
        out = original(args, kwargs)
        seen.append(out is not None)
        return out

    few_rows._rerouted = counted
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits
            with few_row_products():
                got = model(input_ids=ids).logits
                rerouted, calls = sum(seen), len(seen)
                other = threading.Thread(target=lambda: model(input_ids=ids))
                other.start()
                other.join()
    finally:
        few_rows._rerouted = original
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert rerouted > 0 and len(seen) == calls  # the other thread ran without the mode
