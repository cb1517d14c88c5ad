"""Top-k and argmax read in blocks (deepen_engine/reductions.py) give torch's answers."""

from __future__ import annotations

import pytest
import torch

from deepen_engine.reductions import (
    BLOCK,
    MIN_LOGITS,
    _blocked,
    argmax,
    block_maxima,
    exp_,
    log_normaliser,
    top_k,
)

VOCAB = 1 << 16  # 1024 blocks: read in blocks for k up to 128


def _logits(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_the_rows_here_are_read_in_blocks():
    """The tests below check the blocked path, not torch's fallback."""
    assert _blocked(_logits(2, 0), 64)
    assert _blocked(_logits(1, 0).expand(2, -1), 64)
    assert not _blocked(_logits(1, 0), 64)  # fewer than MIN_LOGITS in all
    assert not _blocked(torch.zeros(4, VOCAB - 1), 1)  # not whole blocks
    assert not _blocked(torch.zeros(2, 8 * 64 * BLOCK - BLOCK), 64)  # too few blocks
    assert VOCAB * 2 >= MIN_LOGITS


@pytest.mark.parametrize("k", [1, 5, 64, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_equals_torch_topk(k, seed):
    x = _logits(3, seed)
    values, ids = top_k(x, k)
    expected_values, expected_ids = x.topk(k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)  # random logits: no ties


def test_top_k_when_the_winners_share_a_few_blocks():
    """All of a row's k largest in two neighbouring blocks, the rest of the row far below."""
    x = _logits(2, 3) - 100.0
    x[0, 5 * BLOCK : 7 * BLOCK] += 200.0
    x[1, -BLOCK:] += 200.0  # the last block
    values, ids = top_k(x, 64)
    expected_values, expected_ids = x.topk(64, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)


def test_top_k_with_most_of_the_row_at_minus_infinity():
    """As the fuser calls it: non-anchor tokens only (the others at -inf)."""
    x = _logits(4, 4)
    masked = torch.rand(VOCAB, generator=torch.Generator().manual_seed(5)) < 0.9
    x[:, masked] = float("-inf")
    values, ids = top_k(x, 64)
    expected_values, expected_ids = x.topk(64, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)
    assert not bool(masked[ids].any())


def test_argmax_equals_torch_argmax():
    x = _logits(8, 6)
    assert torch.equal(argmax(x), x.argmax(-1))


def test_argmax_takes_the_first_of_equal_maxima():
    x = _logits(3, 7)
    x[0, [40, 9000, 30000]] = 50.0  # in three blocks
    x[1, [BLOCK + 3, BLOCK + 1]] = 50.0  # in one block
    x[2] = float("-inf")  # every value equal
    assert argmax(x).tolist() == [40, BLOCK + 1, 0]
    assert torch.equal(argmax(x), x.argmax(-1))


def test_argmax_with_nan_answers_as_torch():
    x = _logits(2, 8)
    x[0, 12345] = float("nan")
    assert argmax(x).tolist()[0] == 12345
    assert torch.equal(argmax(x), x.argmax(-1))


def test_small_or_ragged_rows_use_torch():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(9))
    assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(top_k(x, 10)[1], x.topk(10, dim=-1).indices)


@pytest.mark.parametrize("seed", [0, 1])
def test_log_normaliser_and_exp_equal_torchs_to_float_rounding(seed):
    x = _logits(3, seed) * 4  # logits spread over about +-40
    assert torch.allclose(log_normaliser(x), x.logsumexp(-1, keepdim=True), rtol=1e-6, atol=0)
    probs = exp_(x - x.logsumexp(-1, keepdim=True))
    assert torch.allclose(probs, torch.softmax(x, -1), rtol=1e-5, atol=1e-12)
    assert log_normaliser(x).shape == (3, 1)


def test_log_normaliser_of_infinite_and_nan_rows_as_torch():
    x = torch.zeros(4, 8)
    x[0] = float("-inf")  # every token masked: -inf, not NaN
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3, :4] = float("-inf")
    expected = x.logsumexp(-1, keepdim=True)
    got = log_normaliser(x)
    assert got[0].item() == float("-inf") and got[1].item() == float("inf")
    assert got[2].isnan().item()
    assert torch.allclose(got[3], expected[3])
    assert exp_(torch.tensor([float("-inf"), 0.0])).tolist() == [0.0, 1.0]


def test_top_k_and_log_normaliser_from_block_maxima_read_once():
    """A caller that read the block maxima once gets the same answers from both."""
    x = _logits(4, 5)
    maxima = block_maxima(x, 64)
    assert maxima is not None and maxima.shape == (4, VOCAB // BLOCK)
    values, ids = top_k(x, 64, maxima)
    assert torch.equal(values, x.topk(64, dim=-1).values)
    assert torch.equal(ids, x.topk(64, dim=-1).indices)
    top = maxima.amax(-1, keepdim=True)
    assert torch.equal(log_normaliser(x, top), log_normaliser(x))
    assert block_maxima(torch.zeros(2, 1000), 64) is None  # not read in blocks
