"""Unit tests for deepen_engine.fusion.deepen (Fuser) and FusionConfig validation."""

from __future__ import annotations

import math

import pytest
import torch

from deepen_engine.alignment.relative import RelativeSpace
from deepen_engine.alignment.vocabulary import Anchors
from deepen_engine.config import FusionConfig
from deepen_engine.errors import ConfigError
from deepen_engine.fusion import DeepenFuser
from tests.conftest import PLAIN

# Synthetic members. Anchor a (0..NUM_ANCHORS-1) is main id 1 + a and helper id
# NUM_ANCHORS - a; id 0 of each member is its special EOS; the last ids are non-anchors.
NUM_ANCHORS = 8
MAIN_V = 1 + NUM_ANCHORS + 4  # 13: ids 9..12 are not anchors
HELPER_V = 1 + NUM_ANCHORS + 3  # 12: ids 9..11 are not anchors
EOS = 0


def _token_maps():
    main_ids = torch.arange(1, NUM_ANCHORS + 1)
    helper_ids = torch.arange(NUM_ANCHORS, 0, -1)
    main_to = torch.full((MAIN_V,), -1, dtype=torch.long)
    main_to[main_ids] = torch.arange(NUM_ANCHORS)
    helper_to = torch.full((HELPER_V,), -1, dtype=torch.long)
    helper_to[helper_ids] = torch.arange(NUM_ANCHORS)
    return (main_ids, main_to), (helper_ids, helper_to)


def _anchors():
    (main_ids, main_to), (helper_ids, helper_to) = _token_maps()
    texts = [b"t%d" % a for a in range(NUM_ANCHORS)]
    return Anchors(
        texts=texts, token_ids=[main_ids, helper_ids], token_to_anchor=[main_to, helper_to]
    )


def _spaces(tau=5.0, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    (main_ids, main_to), (helper_ids, helper_to) = _token_maps()
    main = RelativeSpace(torch.randn(MAIN_V, dim, generator=g), main_ids, main_to, tau=tau)
    helper = RelativeSpace(torch.randn(HELPER_V, dim, generator=g), helper_ids, helper_to, tau=tau)
    return main, helper


def _has_text():
    main = torch.ones(MAIN_V, dtype=torch.bool)
    main[EOS] = False
    helper = torch.ones(HELPER_V, dtype=torch.bool)
    helper[EOS] = False
    return main, helper


def _fuser(n_members=2, tau=5.0, **config) -> DeepenFuser:
    config.setdefault("min_anchors", 1)
    spaces = _spaces(tau=tau)[:n_members]
    has_text = _has_text()[:n_members]
    anchors = _anchors()
    if n_members == 1:
        anchors = Anchors(anchors.texts, anchors.token_ids[:1], anchors.token_to_anchor[:1])
    ends = [frozenset({EOS})] * n_members
    return DeepenFuser(spaces, has_text, anchors, FusionConfig(**{**PLAIN, **config}), ends)


def _random_logits(batch, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(batch, MAIN_V, generator=g) * scale
    helper = torch.randn(batch, HELPER_V, generator=g) * scale
    main[:, EOS] = -10.0  # EOS is never the main member's top token here
    helper[:, EOS] = -10.0
    return [main, helper]


# Reference inverse search --------------------------------------------------------------


def _candidate_rows(space: RelativeSpace, cand_ids: list[int]) -> torch.Tensor:
    """R: the relative row of each candidate: one-hot for anchors, exact otherwise."""
    rows = torch.zeros(len(cand_ids), space.num_anchors, dtype=torch.float64)
    for j, v in enumerate(cand_ids):
        a = int(space.token_to_anchor[v])
        if a >= 0:
            rows[j, a] = 1.0
        else:
            rows[j] = space.exact_rows(torch.tensor([v]))[0].double()
    return rows


def _reference_search(z0, rows, r, eta, steps, weight_decay=0.01, t_max=10, eta_min_ratio=0.25):
    """torch autograd + AdamW + CosineAnnealingLR on KL(r || softmax(z) @ R) / A."""
    z = z0.detach().double().clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=eta, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=t_max, eta_min=eta * eta_min_ratio
    )
    r = r.double()
    num_anchors = r.shape[-1]
    for _ in range(steps):
        opt.zero_grad()
        q = torch.softmax(z, -1) @ rows
        mask = q.detach() > 1e-12
        log_r = torch.where(r > 0, r, 1.0).log()
        loss = (r * (log_r - q.clamp(min=1e-300).log()))[mask].sum() / num_anchors
        loss.backward()
        opt.step()
        sched.step()
    return z.detach()


def _random_simplex(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, generator=g) * 2, -1)


@pytest.mark.parametrize(
    "cand",
    [
        [1, 2, 3, 4, 5],  # anchors only: one-hot rows
        [1, 9, 4, 10, 7, 12],  # anchors and non-anchors: dense rows
        [9, 10, 11, 12],  # non-anchors only
    ],
    ids=["anchors", "mixed", "dense"],
)
@pytest.mark.parametrize("eta", [0.15, 0.5])
def test_inverse_search_matches_autograd_adamw(cand, eta):
    fuser = _fuser(eta=eta, steps=5)
    space = fuser.spaces[0]
    g = torch.Generator().manual_seed(len(cand))
    z0 = torch.randn(1, len(cand), generator=g)
    r = _random_simplex(NUM_ANCHORS, seed=3)[None]
    got = fuser._inverse_search(
        z0.clone(), torch.ones_like(z0, dtype=torch.bool), torch.tensor([cand]), r
    )
    expected = _reference_search(z0[0], _candidate_rows(space, cand), r[0], eta=eta, steps=5)
    assert not torch.allclose(expected, z0[0].double(), atol=1e-3)  # the search moved
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=0)


def test_inverse_search_with_unreachable_anchors():
    """Anchors no candidate reaches (q = 0) carry no gradient, as in the reference."""
    fuser = _fuser(eta=0.3, steps=5)
    cand = [1, 2, 3]  # one-hot on anchors 0..2: anchors 3..7 unreachable
    z0 = torch.tensor([[0.2, -0.1, 0.4]])
    r = _random_simplex(NUM_ANCHORS, seed=5)[None]
    got = fuser._inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), torch.tensor([cand]), r)
    expected = _reference_search(z0[0], _candidate_rows(fuser.spaces[0], cand), r[0], 0.3, 5)
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_inverse_search_schedule_over_steps(steps):
    """Past T_max the cosine schedule comes back up, as CosineAnnealingLR does."""
    fuser = _fuser(eta=0.2, steps=steps)
    cand = [2, 9, 5, 11]
    z0 = torch.tensor([[0.5, 0.0, -0.3, 0.1]])
    r = _random_simplex(NUM_ANCHORS, seed=7)[None]
    got = fuser._inverse_search(z0, torch.ones_like(z0, dtype=torch.bool), torch.tensor([cand]), r)
    expected = _reference_search(z0[0], _candidate_rows(fuser.spaces[0], cand), r[0], 0.2, steps)
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cands",
    [[[1, 9, 4, 10], [3, 12]], [[9, 10, 11, 12], [1, 2, 3], [3, 12], [4, 11, 5]]],
    ids=["two-rows", "rows-without-dense-between"],
)
def test_inverse_search_batched_with_padding(cands):
    """Rows with fewer candidates are padded, rows with and without dense (non-anchor)
    candidates mix; each valid row matches its own reference."""
    fuser = _fuser(eta=0.15, steps=5)
    width = max(len(row) for row in cands)
    cand_ids = torch.tensor([row + [row[0]] * (width - len(row)) for row in cands])
    valid = torch.tensor([[j < len(row) for j in range(width)] for row in cands])
    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(len(cands), width, generator=g)
    r = torch.stack([_random_simplex(NUM_ANCHORS, seed=s) for s in range(1, len(cands) + 1)])
    got = fuser._inverse_search(z0, valid, cand_ids, r)
    for b, row in enumerate(cands):
        expected = _reference_search(
            z0[b, : len(row)], _candidate_rows(fuser.spaces[0], row), r[b], 0.15, 5
        )
        torch.testing.assert_close(got[b, : len(row)].double(), expected, atol=1e-5, rtol=0)


# Fuser.fuse ----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [{"eta": 0.0}, {"steps": 0}], ids=["eta0", "steps0"])
def test_eta_or_steps_zero_returns_main_logits_exactly(setting):
    fuser = _fuser(**setting)
    logits = _random_logits(3)
    assert fuser.is_identity
    assert torch.equal(fuser.fuse(logits), logits[0])


def test_single_member_is_identity():
    fuser = _fuser(n_members=1, weights=[1.0])
    logits = _random_logits(2)[:1]
    assert fuser.is_identity
    assert torch.equal(fuser.fuse(logits), logits[0])


def test_zero_helper_weight_is_identity():
    fuser = _fuser(weights=[1.0, 0.0])
    logits = _random_logits(2)
    assert torch.equal(fuser.fuse(logits), logits[0])


def test_fusion_changes_logits_with_default_settings():
    fuser = _fuser()
    logits = _random_logits(2)
    fused = fuser.fuse(logits)
    assert fused.shape == logits[0].shape
    assert fused.dtype == torch.float32
    assert not torch.allclose(fused, logits[0])


def test_main_eos_row_unchanged():
    fuser = _fuser(eta=0.5)
    logits = _random_logits(2, seed=4)
    logits[0][0, EOS] = 20.0  # row 0: the main member's top token is EOS
    fused = fuser.fuse(logits)
    assert torch.equal(fused[0], logits[0][0])
    assert not torch.allclose(fused[1], logits[0][1])  # row 1 is fused


def test_helper_lifts_token_outside_main_top_candidates():
    # Main: ids 1 and 2 lead; id 7 (anchor 6) is far behind, outside the top-2 candidates.
    main = torch.full((1, MAIN_V), -4.0)
    main[0, 1], main[0, 2], main[0, 7] = 3.0, 2.5, -3.0
    # Helper: all its mass on its token for anchor 6 (helper id NUM_ANCHORS - 6 = 2).
    helper = torch.full((1, HELPER_V), -30.0)
    helper[0, NUM_ANCHORS - 6] = 30.0
    logits = [main, helper]

    fuser = _fuser(candidates=2, top_k=4, eta=3.0, steps=5, weights=[0.1, 0.9])
    cand_ids, valid = fuser._candidates(
        main.topk(2).indices, [torch.tensor([[0, 1, 2, 3]]), torch.tensor([[6, -1, -1, -1]])]
    )
    assert 7 in cand_ids[valid].tolist()

    fused = fuser.fuse(logits)
    assert main.argmax(-1).item() == 1
    assert fused.argmax(-1).item() == 7
    assert fused[0, 7] > main[0, 7]


def test_batched_rows_equal_rows_fused_alone():
    fuser = _fuser(top_k=3, candidates=3, eta=0.5)
    logits = _random_logits(3, seed=9, scale=2.0)
    batched = fuser.fuse(logits)
    for b in range(3):
        alone = fuser.fuse([x[b : b + 1] for x in logits])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=0)


def test_batched_rows_with_different_candidate_counts_equal_rows_alone():
    """Rows whose helper proposes anchors inside / outside the main top set pad differently."""
    fuser = _fuser(top_k=2, candidates=2, eta=0.5)
    main = torch.full((3, MAIN_V), -5.0)
    main[:, 1], main[:, 2] = 2.0, 1.0  # every row's main top-2: ids 1, 2
    helper = torch.full((3, HELPER_V), -5.0)
    helper[0, NUM_ANCHORS - 0], helper[0, NUM_ANCHORS - 1] = 2.0, 1.0  # anchors 0, 1: ids 1, 2
    helper[1, NUM_ANCHORS - 4], helper[1, NUM_ANCHORS - 5] = 2.0, 1.0  # anchors 4, 5: new ids
    helper[2, NUM_ANCHORS - 0], helper[2, NUM_ANCHORS - 6] = 2.0, 1.0  # one new id
    logits = [main, helper]
    batched = fuser.fuse(logits)
    for b in range(3):
        alone = fuser.fuse([x[b : b + 1] for x in logits])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=0)


def test_candidates_equal_the_row_by_row_rule():
    """Per row: the main top ids, then each helper's proposed anchors' main ids, each once,
    specials dropped; pads repeat the row's first id (the rule read one row at a time)."""
    fuser = _fuser(candidates=4)
    g = torch.Generator().manual_seed(7)
    main_ids, has_text = fuser.anchors.token_ids[0], fuser.has_text[0]
    for batch in (1, 3, 8):
        top = torch.randint(0, MAIN_V, (batch, 4), generator=g)
        helper = torch.randint(-1, NUM_ANCHORS, (batch, 4), generator=g)
        cand_ids, valid = fuser._candidates(top, [None, helper])
        for b in range(batch):
            ids = top[b].tolist() + main_ids[helper[b][helper[b] >= 0]].tolist()
            want = [t for t in dict.fromkeys(ids) if bool(has_text[t])]
            assert cand_ids[b][valid[b]].tolist() == want
            assert set(cand_ids[b][~valid[b]].tolist()) <= set(want[:1] or [0])
        assert valid.shape == cand_ids.shape and valid[:, 0].any()


def test_special_tokens_are_never_candidates():
    fuser = _fuser(candidates=4)
    main = torch.zeros(1, MAIN_V)
    main[0, EOS] = 5.0
    top = main.topk(4).indices  # the main member's top-4 includes its EOS
    assert EOS in top.tolist()[0]
    cand_ids, valid = fuser._candidates(top, [torch.tensor([[-1]]), torch.tensor([[-1]])])
    assert EOS not in cand_ids[valid].tolist()


def test_weights_are_applied():
    """A helper with more weight pulls the fused distribution further toward its token."""
    logits = _random_logits(1, seed=2)
    logits[1][0, NUM_ANCHORS - 3] = 8.0  # helper's top token: its id for anchor 3
    main_id = 1 + 3  # the main member's id for anchor 3
    light = _fuser(weights=[0.9, 0.1], eta=0.5).fuse(logits)
    heavy = _fuser(weights=[0.1, 0.9], eta=0.5).fuse(logits)

    def prob(x):
        return torch.softmax(x, -1)[0, main_id]

    assert prob(light) > prob(logits[0])
    assert prob(heavy) > prob(light)


# FusionConfig validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [[1.0, -0.5], [float("nan"), 1.0], [0.0, 0.0], [], [float("inf"), 1.0]]
)
def test_bad_weights_raise_config_error(weights):
    with pytest.raises(ConfigError, match="weights") as info:
        FusionConfig(weights=weights)
    assert isinstance(info.value, ValueError)


def test_normalised_weights():
    assert FusionConfig().normalised_weights(4) == [0.25] * 4
    assert FusionConfig(weights=[1.0, 3.0]).normalised_weights(2) == [0.25, 0.75]


def test_normalised_weights_wrong_length_names_counts():
    config = FusionConfig(weights=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match=r"3 values for 2 members"):
        config.normalised_weights(2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("eta", -0.1), ("steps", -1), ("top_k", 0), ("candidates", 0), ("tau", 0.0)],
)
def test_out_of_range_fields_raise_naming_field(field, value):
    with pytest.raises(ConfigError, match=rf"FusionConfig\.{field}\b") as info:
        FusionConfig(**{field: value})
    assert isinstance(info.value, ValueError)


def test_bad_assignment_raises_config_error():
    """validate_assignment is on: a bad value set later must fail like one given at creation."""
    config = FusionConfig()
    with pytest.raises(ConfigError, match=r"FusionConfig\.eta"):
        config.eta = -1.0


def test_unknown_field_raises_naming_it():
    with pytest.raises(ConfigError, match="learning_rate"):
        FusionConfig(learning_rate=0.1)


def test_defaults_are_reference_settings():
    config = FusionConfig()
    assert (config.eta, config.steps, config.tau) == (0.15, 5, 100.0)
    assert (config.weight_decay, config.schedule_t_max, config.eta_min_ratio) == (0.01, 10, 0.25)
    assert math.isclose(config.eta * config.eta_min_ratio, 0.15 / 4)


# Fast path: which non-anchor tokens enter -----------------------------------------------


@pytest.mark.parametrize(("top_k", "top_mass"), [(3, 0.999), (50, 0.9), (50, 0.5), (50, 1.0)])
def test_kept_non_anchors_by_mass_with_a_cap(top_k, top_mass):
    """Plain loop: most probable non-anchor first, while the mass not yet entered exceeds
    1 - top_mass, at most top_k; the rest is reported as left out."""
    from deepen_engine.fusion.deepen import kept_non_anchors

    g = torch.Generator().manual_seed(top_k)
    probs = torch.softmax(torch.randn(2, 30, generator=g) * 2, -1)
    is_anchor = torch.zeros(30, dtype=torch.bool)
    is_anchor[::3] = True
    ids, kept, leftout = kept_non_anchors(probs, is_anchor, top_k, top_mass)
    for b in range(2):
        rest = sorted(
            ((float(probs[b, v]), v) for v in range(30) if not is_anchor[v]), reverse=True
        )
        remaining = sum(p for p, _ in rest)
        expected = []
        for p, v in rest[:top_k]:
            if remaining <= 1 - top_mass:
                break
            expected.append(v)
            remaining -= p
        got = [int(ids[b, j]) for j in range(ids.shape[1]) if kept[b, j] > 0]
        assert got == expected
        assert math.isclose(float(leftout[b]), remaining, abs_tol=1e-6)


def test_fast_path_counts_every_anchor_token():
    """Anchor tokens enter whatever their rank (one-hot rows cost nothing); here one
    non-anchor token (top_k=1) enters on top: r = (p_anchors + p_v rel(v)) / kept mass."""
    fuser = _fuser(top_k=1, top_mass=0.999)
    space = fuser.spaces[0]
    logits = torch.randn(1, MAIN_V, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits, -1)
    probs[:, EOS] = 0.0  # a special token never enters
    r = fuser._relative(logits, logits.logsumexp(-1, keepdim=True), 0, space, True)[0][0]
    best = NUM_ANCHORS + 1 + int(probs[0, NUM_ANCHORS + 1 :].argmax())  # top non-anchor id
    expected = torch.zeros(NUM_ANCHORS)
    for v in range(1, NUM_ANCHORS + 1):  # main id 1 + a is anchor a
        expected[v - 1] += probs[0, v]
    expected += probs[0, best] * space.exact_rows(torch.tensor([best]))[0]
    torch.testing.assert_close(r, expected / expected.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("top_k", "top_mass"), [(1, 0.999), (2, 0.9), (4, 1.0), (4, 0.5)])
def test_relative_from_logits_equals_relative_from_probabilities(top_k, top_mass):
    """`_relative` reads the logits at the anchor tokens and the top non-anchor tokens only
    (no full-vocabulary mask); it equals the formula on the masked probabilities, with the
    tokens `kept_non_anchors` picks."""
    from deepen_engine.fusion.deepen import kept_non_anchors

    fuser = _fuser(top_k=top_k, top_mass=top_mass)
    space = fuser.spaces[0]
    logits = torch.randn(3, MAIN_V, generator=torch.Generator().manual_seed(top_k)) * 2
    logits[1, EOS] = 6.0  # a row where the special token holds most of the probability
    r = fuser._relative(logits, logits.logsumexp(-1, keepdim=True), 0, space, True)[0]
    probs = torch.softmax(logits, -1)
    probs[:, EOS] = 0.0
    is_anchor = space.token_to_anchor >= 0
    ids, kept, _ = kept_non_anchors(probs, is_anchor, top_k, top_mass)
    for b in range(3):
        expected = torch.zeros(NUM_ANCHORS)
        expected.index_add_(0, space.token_to_anchor[is_anchor], probs[b, is_anchor])
        for j in range(ids.shape[1]):
            if kept[b, j] > 0:
                row = space.exact_rows(ids[b, j : j + 1])[0]
                expected += probs[b, ids[b, j]] * row
        torch.testing.assert_close(r[b], expected / expected.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 5, 11])
def test_a_helpers_candidates_are_its_top_tokens_with_text(c):
    """A helper proposes its `candidates` most probable tokens, special tokens never (its
    EOS here is its most probable token)."""
    fuser = _fuser(candidates=c)
    helper = _random_logits(3, seed=c)[1]
    helper[:, EOS] = 9.0
    lse = helper.logsumexp(-1, keepdim=True)
    _, values, ids = fuser._relative(helper, lse, 1, fuser.spaces[1], specials=False)
    expected = helper.masked_fill(~fuser.has_text[1], float("-inf")).topk(c, dim=-1)
    assert torch.equal(ids, expected.indices)  # no ties in random logits: the same order
    assert torch.equal(values, expected.values)
    assert EOS not in ids.flatten().tolist()


def test_fusers_of_one_ensemble_share_the_member_tables(tiny_ensemble):
    """`main="auto"` makes a fuser per request and leader: their DeePEn index tables are
    the ensemble's, not rebuilt per fuser (a copy per fuser on a GPU stayed for good)."""
    fuser = tiny_ensemble.fuser.with_config(FusionConfig(**{**PLAIN, "method": "deepen"}))
    other = fuser.with_config(fuser.config.model_copy(update={"main": 1, "eta": 0.3}))
    assert len(fuser.tables) == 2
    assert all(a is b for a, b in zip(fuser.tables, other.tables))


def test_member_tables_list_each_anchors_first_token_in_anchor_order():
    """The first tokens of `anchor_tokens` are each anchor's lowest id, in anchor order
    (gathered, they are the relative distribution's anchor part); the others follow."""
    from deepen_engine.fusion.tables import TWO_READS_FROM, MemberTables

    to_anchor = torch.tensor([2, -1, 0, 1, 0, 2, -1])
    tables = MemberTables.build(to_anchor, torch.ones(7, dtype=torch.bool))
    assert tables.anchor_tokens.tolist() == [2, 3, 0, 4, 5]
    assert tables.anchor_index.tolist() == [0, 1, 2, 0, 2]
    assert tables.first_count == 3
    assert tables.anchor_read.tolist() == [2, 3, 0, 4, 5] and tables.anchor_order is None
    # a large vocabulary is read by ascending id, then put in that order: the same values
    big = torch.full((TWO_READS_FROM + 7,), -1)
    big[-7:] = to_anchor
    large = MemberTables.build(big, torch.ones(big.numel(), dtype=torch.bool))
    assert (large.anchor_read - TWO_READS_FROM).tolist() == [0, 2, 3, 4, 5]
    assert large.anchor_order is not None
    assert (large.anchor_read[large.anchor_order] - TWO_READS_FROM).tolist() == [2, 3, 0, 4, 5]
    x = torch.randn(2, big.numel())
    two_reads = x.index_select(1, large.anchor_read).index_select(1, large.anchor_order)
    assert torch.equal(two_reads, x.index_select(1, large.anchor_tokens))
    missing = MemberTables.build(torch.tensor([1, -1, 1]), torch.ones(3, dtype=torch.bool))
    assert missing.first_count == 1  # anchor 0 has no token: not every anchor's first


@pytest.mark.parametrize("duplicate", [9, 12])
def test_an_anchor_with_two_tokens_counts_both(duplicate):
    """A main token that writes an anchor's text a second time (here anchor 3) is one-hot
    on that anchor: the relative distribution adds both tokens' probabilities."""
    from deepen_engine.fusion.deepen import kept_non_anchors
    from deepen_engine.fusion.tables import MemberTables

    fuser = _fuser(top_k=2, top_mass=0.999)
    space = fuser.spaces[0]
    to_anchor = space.token_to_anchor.clone()
    to_anchor[duplicate] = 3
    main_ids = _token_maps()[0][0]
    space = RelativeSpace(space._embeddings, main_ids, to_anchor, tau=5.0)
    fuser.spaces[0] = space
    fuser.tables[0] = MemberTables.build(to_anchor, fuser.has_text[0])
    assert fuser.tables[0].first_count == NUM_ANCHORS
    logits = torch.randn(2, MAIN_V, generator=torch.Generator().manual_seed(duplicate)) * 2
    r = fuser._relative(logits, logits.logsumexp(-1, keepdim=True), 0, space, True)[0]
    probs = torch.softmax(logits, -1)
    probs[:, EOS] = 0.0
    is_anchor = to_anchor >= 0
    ids, kept, _ = kept_non_anchors(probs, is_anchor, 2, 0.999)
    for b in range(2):
        expected = torch.zeros(NUM_ANCHORS)
        expected.index_add_(0, to_anchor[is_anchor], probs[b, is_anchor])
        for j in range(ids.shape[1]):
            if kept[b, j] > 0:
                expected += probs[b, ids[b, j]] * space.exact_rows(ids[b, j : j + 1])[0]
        torch.testing.assert_close(r[b], expected / expected.sum(), atol=1e-6, rtol=0)


def test_requests_with_many_taus_keep_a_few_relative_spaces(tiny_ensemble, monkeypatch):
    """Each tau has its own relative spaces and row caches: the fusion context keeps the
    ensemble's own and the 3 most recent others, and so do the ensemble's cached views; a
    tau used again after its spaces went gives the same text (rows computed again)."""
    from deepen_engine.fusion.context import MAX_SPACE_SETTINGS

    monkeypatch.setattr(tiny_ensemble, "_views", {})
    context = tiny_ensemble.fuser.context
    own = tiny_ensemble.fuser.spaces
    first = tiny_ensemble.view({"tau": 3.0}).generate("Hello", max_new_tokens=6)
    for tau in (4.0, 5.0, 6.0, 7.0, 8.0):
        tiny_ensemble.view({"tau": tau}).generate("Hello", max_new_tokens=2)
    assert len(context._spaces) == MAX_SPACE_SETTINGS == 4
    kept = {key[0] for key in context._spaces}
    assert kept == {tiny_ensemble.fusion.tau, 6.0, 7.0, 8.0}
    assert {v.fusion.tau for v in tiny_ensemble._views.values()} == {6.0, 7.0, 8.0}
    assert tiny_ensemble.fuser.spaces is own
    again = tiny_ensemble.view({"tau": 3.0}).generate("Hello", max_new_tokens=6)
    assert again.token_ids == first.token_ids
    assert {v.fusion.tau for v in tiny_ensemble._views.values()} == {3.0, 7.0, 8.0}


def test_cache_view_keeps_the_newest_views_of_three_other_taus():
    from types import SimpleNamespace

    from deepen_engine.fusion.context import cache_view

    def view(tau):
        return SimpleNamespace(fusion=SimpleNamespace(tau=tau))

    views: dict = {}
    for key, tau in [("a", 1.0), ("b", 100.0), ("c", 2.0), ("d", 3.0), ("e", 1.0), ("f", 4.0)]:
        cache_view(views, key, view(tau), size=5, own_tau=100.0)
    # tau 2 is the least recently added other tau; "a" went first as the oldest of 5
    assert list(views) == ["b", "d", "e", "f"]
