"""The fusion methods and the relative-row disk cache on the default members."""

from __future__ import annotations

import pytest

from deepen_engine import Ensemble
from tests.conftest import PLAIN

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:"]


@pytest.fixture(scope="module")
def ensemble(default_ensemble):
    return default_ensemble


@pytest.mark.parametrize("method", ["union", "unite"])
def test_union_methods_batched_equal_alone_and_differ_from_main(ensemble, method):
    view = ensemble.with_fusion(method=method)
    batch = view.generate(PROMPTS, max_new_tokens=8, speculate=0)  # standard steps: fed below
    for prompt, result in zip(PROMPTS, batch):
        assert view.generate(prompt, max_new_tokens=8).text == result.text
        assert result.usage.fed_positions[ensemble.members[1].name] <= 1.5 * 8 + 1


@pytest.mark.parametrize("method", ["union", "unite"])
def test_all_weight_on_the_main_member_is_the_main_member(ensemble, method):
    # fixed weights: the prompt's weights would move weight to the other member
    alone = ensemble.with_fusion(**PLAIN, eta=0).generate(PROMPTS, max_new_tokens=8)
    view = ensemble.with_fusion(**PLAIN, method=method, weights=[1.0, 0.0])
    assert [r.text for r in view.generate(PROMPTS, max_new_tokens=8)] == [r.text for r in alone]


def test_gate_agree_fires_and_keeps_answers_close(ensemble):
    view = ensemble.with_fusion(method="union", gate="agree")
    view.generate(PROMPTS, max_new_tokens=8)
    assert 0 < view.fuser.stats.gated < view.fuser.stats.rows


def test_a_new_ensemble_reads_the_rows_from_disk(ensemble):
    first = ensemble.generate(PROMPTS, max_new_tokens=6)
    for space in ensemble.fuser.spaces:
        space.store.flush()
    again = Ensemble()
    second = again.generate(PROMPTS, max_new_tokens=6)
    assert [r.text for r in second] == [r.text for r in first]
    assert sum(s.store.loaded for s in again.fuser.spaces) > 0
    assert sum(s.rows_computed for s in again.fuser.spaces) == 0
