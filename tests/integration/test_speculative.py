"""Speculative decoding on the default members: greedy output identical to standard
decoding with the main member drafting and with the smaller member drafting for it."""

from __future__ import annotations

import pytest

from deepen_engine import GenerationConfig

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "Q: What is 12 + 7?\nA:",
    "def fibonacci(n):\n    ",
]


@pytest.mark.parametrize("main", ["auto", 1])
def test_greedy_speculation_equals_standard_decoding(default_ensemble, main):
    view = default_ensemble.with_fusion(main=main)
    base = view.generate(PROMPTS, max_new_tokens=12, speculate=0)
    assert view.scheduler_config.speculate_max_rows == 1  # the default: rows alone speculate
    for drafter in ("main", "auto", 0, "lookup"):
        # one row at a time, within the limit, so every row drafts
        out = [view.generate(p, max_new_tokens=12, speculate=4, drafter=drafter) for p in PROMPTS]
        assert [r.text for r in out] == [r.text for r in base], drafter
        assert [r.token_ids for r in out] == [r.token_ids for r in base], drafter
        assert [r.finish_reason for r in out] == [r.finish_reason for r in base], drafter
        assert all(r.usage.drafts > 0 for r in out), drafter
    # more rows than the limit (one prompt thrice: one leader, so one batch): standard
    # steps, the same text
    out = view.generate([PROMPTS[0]] * 3, max_new_tokens=12, speculate=4)
    assert [r.token_ids for r in out] == [base[0].token_ids] * 3
    assert sum(r.usage.drafts for r in out) == 0
    # the default (speculate unset) drafts for a row alone, with the same text
    out = [view.generate(p, max_new_tokens=12) for p in PROMPTS]
    assert [r.token_ids for r in out] == [r.token_ids for r in base]
    assert all(r.usage.drafts > 0 for r in out)


def test_seeded_sampling_with_speculation_equals_without(default_ensemble):
    """Sampled rows read the same number per position with and without drafts, so a seed
    gives the same tokens either way (decoding/sampling.py)."""
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.95, seed=5)
    for prompt in PROMPTS:
        base = default_ensemble.generate(prompt, speculate=0, **kw)
        out = default_ensemble.generate(prompt, speculate=4, **kw)
        assert out.token_ids == base.token_ids and out.text == base.text
        assert out.usage.drafts > 0


@pytest.mark.parametrize("main", [0, 1], ids=["smollm2-leads", "gemma3-leads"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_drafts_in_either_precision_give_the_standard_text(default_ensemble, main, precision):
    """The main member drafting through its bfloat16 draft body (`draft_precision`, forced
    here so machines without native bfloat16 run it too) or its own body: each row alone
    gives the standard decoding's token ids."""
    from tests.unit.test_speculative import _drive

    view = default_ensemble.with_fusion(main=main)
    base = [view.generate(p, max_new_tokens=12, speculate=0).token_ids for p in PROMPTS]
    config = GenerationConfig(max_new_tokens=12, speculate=4)
    for p in range(len(PROMPTS)):
        ids = _drive(view, {0: [p]}, [config] * len(PROMPTS), prompts=PROMPTS, precision=precision)
        assert ids[p] == base[p], (precision, PROMPTS[p])
    layer = default_ensemble.members[main].output_layer
    assert layer is not None
    assert (layer.low_precision is not None) or precision == "float32"
