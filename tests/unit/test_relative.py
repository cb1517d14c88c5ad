"""Unit tests for deepen_engine.alignment.relative: relative rows, distributions, cache, memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from deepen_engine.alignment.relative import RelativeSpace

V, D, A = 50, 16, 20


def _setup(vocab=V, dim=D, num_anchors=A, seed=0):
    """Random embeddings, a random anchor subset and its token_to_anchor map."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, dim, generator=g)
    anchor_ids = torch.randperm(vocab, generator=g)[:num_anchors]
    to_anchor = torch.full((vocab,), -1, dtype=torch.long)
    to_anchor[anchor_ids] = torch.arange(num_anchors)
    return emb, anchor_ids, to_anchor


def _space(tau=100.0, cache_size=4096, chunk=256, **kw):
    emb, anchor_ids, to_anchor = _setup(**kw)
    return RelativeSpace(emb, anchor_ids, to_anchor, tau=tau, cache_size=cache_size, chunk=chunk)


def _brute_row(emb, anchor_ids, v, tau):
    """softmax_a(tau * cos(E[v], E[a])) with plain Python arithmetic, in float64."""
    e = emb.double()

    def cos(x, y):
        return float((x * y).sum() / (x.norm() * y.norm()))

    logits = [tau * cos(e[v], e[a]) for a in anchor_ids.tolist()]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return torch.tensor([w / total for w in weights], dtype=torch.float64)


def _brute_distribution(emb, anchor_ids, to_anchor, probs, ids, tau):
    out = torch.zeros(probs.shape[0], anchor_ids.numel(), dtype=torch.float64)
    for b in range(probs.shape[0]):
        for p, v in zip(probs[b].tolist(), ids[b].tolist()):
            if p == 0:
                continue
            a = int(to_anchor[v])
            if a >= 0:
                out[b, a] += p
            else:
                out[b] += p * _brute_row(emb, anchor_ids, v, tau)
        if out[b].sum() > 0:
            out[b] /= out[b].sum()
    return out


# exact_rows ----------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 5.0, 100.0])
@pytest.mark.parametrize("chunk", [256, 7])
def test_exact_rows_match_brute_force(tau, chunk):
    emb, anchor_ids, to_anchor = _setup()
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=tau, chunk=chunk)
    rows = space.exact_rows(torch.arange(V))
    assert rows.shape == (V, A)
    assert rows.dtype == torch.float32
    expected = torch.stack([_brute_row(emb, anchor_ids, v, tau) for v in range(V)])
    # float32 cosines carry ~1e-7 rounding, which tau multiplies before the softmax.
    atol = 1e-6 * max(1.0, tau / 20)
    torch.testing.assert_close(rows.double(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(rows.sum(-1), torch.ones(V), atol=1e-6, rtol=0)


def test_exact_rows_of_anchor_at_tau_100_peak_on_itself():
    emb, anchor_ids, to_anchor = _setup()
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=100.0)
    rows = space.exact_rows(anchor_ids)
    assert rows.argmax(-1).tolist() == list(range(A))


def test_exact_rows_empty():
    space = _space()
    assert space.exact_rows(torch.tensor([], dtype=torch.long)).shape == (0, A)


# distribution --------------------------------------------------------------------------


def test_distribution_anchor_tokens_are_one_hot():
    emb, anchor_ids, to_anchor = _setup()
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=5.0)
    ids = anchor_ids[[3, 7, 11]][None]
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    out = space.distribution(probs, ids)
    expected = torch.zeros(1, A)
    expected[0, 3], expected[0, 7], expected[0, 11] = 0.5, 0.3, 0.2
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    assert space.rows_computed == 0


def test_distribution_non_anchor_token_is_its_exact_row():
    emb, anchor_ids, to_anchor = _setup()
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=5.0)
    v = int((to_anchor < 0).nonzero()[0])
    out = space.distribution(torch.tensor([[1.0]]), torch.tensor([[v]]))
    torch.testing.assert_close(
        out[0].double(), _brute_row(emb, anchor_ids, v, 5.0), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("tau", [5.0, 100.0])
def test_distribution_matches_brute_force(tau):
    emb, anchor_ids, to_anchor = _setup()
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=tau)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g)[:6] for _ in range(4)])  # (4, 6)
    probs = torch.rand(4, 6, generator=g) * 0.1  # kept mass < 1: must be renormalised
    probs[1, 2] = 0.0  # a zero-probability token contributes nothing
    probs[3] = 0.0  # a row with no kept mass is all zeros
    out = space.distribution(probs, ids)
    assert out.shape == (4, A)
    expected = _brute_distribution(emb, anchor_ids, to_anchor, probs, ids, tau)
    atol = 1e-6 * max(1.0, tau / 20)  # float32 rounding of the cosines, scaled by tau
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(out[:3].sum(-1), torch.ones(3), atol=1e-6, rtol=0)
    assert torch.equal(out[3], torch.zeros(A))
    assert (to_anchor[ids[:3]] < 0).any() and (to_anchor[ids[:3]] >= 0).any()


def test_distribution_all_zero_batch_is_zero():
    space = _space()
    out = space.distribution(torch.zeros(2, 3), torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert torch.equal(out, torch.zeros(2, A))
    assert space.rows_computed == 0


# LRU cache -----------------------------------------------------------------------------


def _non_anchor_ids(space, n):
    ids = (space.token_to_anchor < 0).nonzero().flatten().tolist()
    assert len(ids) >= n
    return ids[:n]


def test_non_anchor_rows_equal_exact_rows():
    space = _space(tau=5.0)
    ids = _non_anchor_ids(space, 5)
    rows = space.non_anchor_rows(ids)
    assert torch.equal(rows, space.exact_rows(torch.tensor(ids)))
    assert space.non_anchor_rows([]).shape == (0, A)


def test_cache_counts_misses_only():
    space = _space()
    a, b, c = _non_anchor_ids(space, 3)
    first = space.non_anchor_rows([a, b, a])
    assert space.rows_computed == 2  # duplicates computed once
    assert torch.equal(first[0], first[2])
    second = space.non_anchor_rows([b, a])
    assert space.rows_computed == 2  # all hits
    assert torch.equal(second, first[[1, 0]])
    space.non_anchor_rows([c, a])
    assert space.rows_computed == 3


def test_cache_hits_through_distribution():
    space = _space()
    ids = torch.tensor([_non_anchor_ids(space, 4)])
    probs = torch.full((1, 4), 0.25)
    first = space.distribution(probs, ids)
    assert space.rows_computed == 4
    second = space.distribution(probs, ids)
    assert space.rows_computed == 4
    assert torch.equal(first, second)


def test_cache_size_bound_and_lru_eviction():
    space = _space(cache_size=2)
    a, b, c = _non_anchor_ids(space, 3)
    space.non_anchor_rows([a, b])
    assert space.rows_computed == 2
    space.non_anchor_rows([a])  # touch a: b is now least recently used
    space.non_anchor_rows([c])  # evicts b
    assert space.rows_computed == 3
    assert len(space._cache) <= 2
    space.non_anchor_rows([a])  # still cached
    assert space.rows_computed == 3
    space.non_anchor_rows([b])  # was evicted: recomputed
    assert space.rows_computed == 4
    assert len(space._cache) <= 2


def test_cache_bound_when_one_call_exceeds_it():
    space = _space(cache_size=3)
    ids = _non_anchor_ids(space, 8)
    rows = space.non_anchor_rows(ids)
    assert rows.shape == (8, A)
    assert torch.equal(rows, space.exact_rows(torch.tensor(ids)))
    assert len(space._cache) <= 3
    space.non_anchor_rows(ids[-3:])  # the most recent three survived
    assert space.rows_computed == 8


def test_cache_size_zero_still_returns_rows():
    space = _space(cache_size=0)
    ids = _non_anchor_ids(space, 2)
    assert space.non_anchor_rows(ids).shape == (2, A)
    assert space.non_anchor_rows(ids).shape == (2, A)
    assert space.rows_computed == 4
    assert len(space._cache) == 0


def test_a_space_at_another_tau_equals_a_fresh_one_and_shares_the_anchor_units():
    space = _space(tau=100.0)
    ids = _non_anchor_ids(space, 4)
    space.non_anchor_rows(ids)
    twin = space.with_settings(5.0, cache_size=16, store=None)
    fresh = _space(tau=5.0, cache_size=16)
    assert twin._anchor_units is space._anchor_units  # shared, not rebuilt
    assert twin.rows_cached == 0 and twin.rows_computed == 0
    assert torch.equal(twin.non_anchor_rows(ids), fresh.non_anchor_rows(ids))
    assert torch.equal(twin.exact_rows(torch.tensor(ids)), fresh.exact_rows(torch.tensor(ids)))
    assert space.tau == 100.0 and space.rows_cached == 4  # the first space is unchanged


def test_reserve_holds_the_whole_cache_and_keeps_rows_and_results():
    space, plain = _space(cache_size=8), _space(cache_size=8)
    a, b, c = _non_anchor_ids(space, 3)
    space.non_anchor_rows([a, b])  # cached before the reservation keep their slots
    assert space.reserve() == 8 * A * 4
    assert space._buffer.shape == (8, A) and space.rows_cached == 2
    assert space.reserve() == 8 * A * 4  # once is enough: the buffer is not replaced
    assert space.rows_computed == 2
    for ids in ([a, b], [c, a], [b, c, a]):
        assert torch.equal(space.non_anchor_rows(ids), plain.non_anchor_rows(ids))
    assert space.rows_computed == 3 and space.rows_cached == 3
    probs = torch.full((1, 3), 1 / 3)
    assert torch.equal(
        space.distribution(probs, torch.tensor([[a, b, c]])),
        plain.distribution(probs, torch.tensor([[a, b, c]])),
    )


def test_reserve_of_a_zero_cache_holds_nothing():
    space = _space(cache_size=0)
    assert space.reserve() == 0
    assert space.non_anchor_rows(_non_anchor_ids(space, 2)).shape == (2, A)


# memory: never |V| x |A| ---------------------------------------------------------------


def test_no_vocab_by_anchor_allocation():
    vocab, dim, num_anchors, k = 20000, 8, 5000, 16
    emb, anchor_ids, to_anchor = _setup(vocab=vocab, dim=dim, num_anchors=num_anchors)
    space = RelativeSpace(emb, anchor_ids, to_anchor, tau=100.0)
    non_anchor = (to_anchor < 0).nonzero().flatten()
    g = torch.Generator().manual_seed(2)
    ids = torch.stack(
        [
            torch.cat([non_anchor[:8], anchor_ids[:8]]),
            torch.cat([non_anchor[8:16], anchor_ids[8:16]]),
        ]
    )  # (2, k)
    probs = torch.softmax(torch.randn(2, k, generator=g), -1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = space.distribution(probs, ids)
        rows = space.non_anchor_rows(non_anchor[16 : 16 + k].tolist())
    assert out.shape == (2, num_anchors)
    assert rows.shape == (k, num_anchors)
    usage = [(e.cpu_memory_usage, e.name) for e in prof.events() if e.name != "[memory]"]
    # The profiler did see the (k, A) float32 rows being allocated: the check is not vacuous.
    assert max(u for u, _ in usage) >= k * num_anchors * 4
    # No op allocated anything as large as |V| x |A| elements, even at one byte each.
    too_big = [(name, u) for u, name in usage if u >= vocab * num_anchors]
    assert too_big == []


@pytest.mark.parametrize("cache_size", [4096, 3])  # the bag over the cache; gathering past it
def test_weighted_sum_equals_the_gathered_rows_weighted(cache_size):
    space = _space(tau=5.0, cache_size=cache_size)
    a, b, c, d = _non_anchor_ids(space, 4)
    tokens = [a, b, c, b, d]  # batch rows 0, 0, 2, 2, 2 (row 1 has none)
    rows_of = torch.tensor([0, 0, 2, 2, 2])
    weights = torch.tensor([0.5, 0.25, 0.1, 0.2, 0.3])
    out = space.weighted_sum(tokens, rows_of, weights, batch=3)
    exact = space.exact_rows(torch.tensor(tokens)) * weights[:, None]
    expected = torch.zeros(3, A).index_add_(0, rows_of, exact)
    assert out.shape == (3, A)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(A))
    assert space.rows_computed == 4  # each distinct row computed once
    if cache_size < 4:  # rows beyond the cache are recomputed: equal up to rounding
        return
    # trailing rows with no entries are zero too, and a row's sum is the same alone
    wide = space.weighted_sum(tokens, rows_of, weights, batch=5)
    assert torch.equal(wide[:3], out) and torch.equal(wide[3:], torch.zeros(2, A))
    alone = space.weighted_sum(tokens[2:], torch.zeros(3, dtype=torch.long), weights[2:], 1)
    assert torch.equal(alone[0], out[2])


# an ensemble's spaces -------------------------------------------------------------------
def test_an_ensembles_row_caches_reserved_in_full_change_no_answer(tiny_ensemble):
    view = tiny_ensemble.with_fusion(method="deepen", row_cache_size=16)
    before = view.generate("The river", max_new_tokens=6)
    anchors = len(tiny_ensemble.anchors)
    assert view.reserve_row_caches() == 2 * 16 * anchors * 4  # two members, float32 rows
    assert view.generate("The river", max_new_tokens=6).token_ids == before.token_ids
    assert tiny_ensemble.with_fusion(method="union").reserve_row_caches() == 0


def test_a_view_at_another_tau_shares_the_anchor_units_and_answers_as_a_fresh_ensemble(
    tiny_ensemble, tiny_pair
):
    from deepen_engine import Ensemble, MemberSpec
    from tests.conftest import PLAIN

    base = tiny_ensemble.with_fusion(method="deepen")
    view = tiny_ensemble.with_fusion(method="deepen", tau=7.0)
    for ours, theirs in zip(view.fuser.spaces, base.fuser.spaces):
        assert ours._anchor_units is theirs._anchor_units and ours.tau == 7.0
    names = [m.name for m in tiny_ensemble.members]
    specs = [MemberSpec(source=pair, name=n) for pair, n in zip(tiny_pair, names)]
    fresh = Ensemble(specs, min_anchors=50, **{**PLAIN, "method": "deepen", "tau": 7.0})
    want = fresh.generate("The river", max_new_tokens=6)
    assert view.generate("The river", max_new_tokens=6).token_ids == want.token_ids
