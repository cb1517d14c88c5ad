"""The full-vocabulary reference fusion: equal to the fast path when the fast path keeps
every token, a bounded left-out mass otherwise, the main member alone at EOS."""

from __future__ import annotations

import pytest
import torch

from deepen_engine.fusion.reference import ReferenceFuser

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]


def _next_logits(ens, prompt):
    out = []
    for m in ens.members:
        ids = m.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(m.model(ids).logits[0, -1].float())
    return out


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
@pytest.mark.parametrize("main", [0, 1])
def test_fast_path_keeping_every_token_equals_the_exact_reference(tiny_ensemble, main, weighting):
    biggest = max(len(m.vocab) for m in tiny_ensemble.members)
    full = tiny_ensemble.with_fusion(
        main=main, top_k=biggest, top_mass=1.0, candidates=biggest, weighting=weighting
    )
    reference = ReferenceFuser(full.fuser, leftout_mass=0.0)
    for prompt in PROMPTS:
        logits = _next_logits(full, prompt)
        fast = full.fuser.fuse([x[None, :] for x in logits])[0]
        step = reference.fuse_row(logits)
        assert step.leftout_mass == [0.0, 0.0]
        assert torch.allclose(fast, step.logits, atol=1e-5)
        assert int(fast.argmax()) == int(step.logits.argmax())
        assert not torch.equal(step.logits, logits[main])  # the search did move logits


def test_leftout_mass_is_bounded_and_reported(tiny_ensemble):
    exact = ReferenceFuser(tiny_ensemble.fuser, leftout_mass=0.0)
    bounded = ReferenceFuser(tiny_ensemble.fuser, leftout_mass=0.05)
    logits = _next_logits(tiny_ensemble, PROMPTS[0])
    step = bounded.fuse_row(logits)
    assert all(0.0 <= m <= 0.05 for m in step.leftout_mass)
    full_step = exact.fuse_row(logits)
    assert all(a <= b for a, b in zip(step.rows_used, full_step.rows_used))
    assert step.rows_used != full_step.rows_used  # tokens were left out


def test_main_members_end_token_on_top_keeps_its_logits(tiny_ensemble):
    logits = _next_logits(tiny_ensemble, PROMPTS[1])
    fuser = tiny_ensemble.fuser
    top = int(logits[fuser.main].argmax())
    original = fuser.main_eos_ids
    fuser.main_eos_ids = torch.tensor([top])
    try:
        step = ReferenceFuser(fuser, leftout_mass=0.0).fuse_row(logits)
    finally:
        fuser.main_eos_ids = original
    assert torch.equal(step.logits, logits[fuser.main])


def test_bad_leftout_mass_is_refused(tiny_ensemble):
    with pytest.raises(ValueError, match="leftout_mass must be in \\[0, 1\\), got 1.5"):
        ReferenceFuser(tiny_ensemble.fuser, leftout_mass=1.5)
