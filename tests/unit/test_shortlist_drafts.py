"""Shortlist drafting (decoding/main_drafts.py): the main member drafts over a shortlist of
its output layer and verification reads the full layer. On tiny members with a forced
shortlist that leaves out a third of the main vocabulary (so drafts often miss): greedy
output identical to `speculate=0`, every member's logits after a step equal a fresh
forward, sampled output distributed as plain sampling; and the shortlist a real pair gets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from deepen_engine import GenerationConfig
from deepen_engine.decoding import main_drafts
from deepen_engine.decoding.main_drafts import draft_shortlist
from deepen_engine.members.output_layer import ShortlistHead
from tests.unit.test_speculative import PROMPTS, _assert_plain_sampling, _drive, _same, _usage


@pytest.fixture
def forced(tiny_ensemble, monkeypatch) -> Iterator[list[int]]:
    """Each member, as main, drafts over its ids not divisible by 3 and its end tokens
    (in float32 and in bfloat16); yields the number of shortlisted draft positions so far
    (a one-item list)."""
    members = tiny_ensemble.members
    drafted, extra = [0], [0]
    logits = ShortlistHead.logits

    def counted(self, hidden, extras=None):
        drafted[0] += hidden.shape[0]
        extra[0] += sum(len(ids) for ids in extras or [])
        return logits(self, hidden, extras)

    monkeypatch.setattr(ShortlistHead, "logits", counted)
    for main, member in enumerate(members):
        layer = member.output_layer
        assert layer is not None
        rows = [i for i in range(len(member.vocab)) if i % 3 or i in member.eos_ids]
        names = tuple(m.name for i, m in enumerate(members) if i != main)
        for dtype in (torch.float32, torch.bfloat16):  # drafts in either precision
            layer.shortlists[names, dtype] = layer.shortlist(torch.tensor(rows), dtype)
    yield drafted
    assert extra[0] > 0  # rows' own tokens off the shortlist were offered to the drafts
    for member in members:
        assert member.output_layer is not None
        member.output_layer.shortlists.clear()


@pytest.mark.parametrize("main", [0, 1], ids=["bpe-main", "sp-main"])
def test_greedy_output_equals_plain_decoding(tiny_ensemble, forced, main):
    view = tiny_ensemble.view({"main": main})
    base = view.generate(PROMPTS, max_new_tokens=24, speculate=0)
    missed = [t for r in base for t in r.token_ids if t % 3 == 0]
    assert missed  # some fused tokens lie outside the shortlist: no draft can propose them
    for k in (2, 4, 8):
        out = view.generate(PROMPTS, max_new_tokens=24, speculate=k)
        _same(base, out)
        drafted, kept = _usage(out)
        assert drafted > kept > 0
    assert forced[0] > 0  # the drafts read the shortlist


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_logits_after_each_step_equal_a_fresh_forward(tiny_ensemble, forced, precision):
    checked, owed, drafted = [], [], []

    def check(decoder):
        decoder.speculator.catch_up()
        for batch in decoder.batches:
            # the forward before a speculative step stops at the shortlist: the full layer
            # is owed, and paid by require_logits
            owed.append(any(row.owed is not None for row in batch.rows))
            # in bfloat16 the draft body fed it: require_logits feeds it again exactly
            drafted.append(any(row.drafted for row in batch.rows))
            logits = batch.require_logits()
            for b, row in enumerate(batch.rows):
                if row.cached < len(row.ids):
                    continue
                with torch.inference_mode():
                    ids = torch.tensor([row.ids])
                    fresh = batch.member.model(input_ids=ids).logits[0, -1]
                torch.testing.assert_close(logits[b], fresh.float(), atol=1e-4, rtol=1e-4)
                checked.append(batch.member is decoder.main_member)

    configs = [GenerationConfig(max_new_tokens=20, speculate=k) for k in (8, 4, 2)]
    view = tiny_ensemble.view({"main": 1})
    ids = _drive(view, {0: [0, 1], 3: [2]}, configs, check, precision=precision)
    assert len(ids) == 3 and checked.count(True) > 10 and forced[0] > 0
    assert (any(owed), any(drafted)) == (precision == "float32", precision == "bfloat16")


def test_sampled_output_equals_plain_sampling(tiny_ensemble, forced):
    """Drafts drawn from the shortlisted distribution, kept against the full fused one."""
    _assert_plain_sampling(tiny_ensemble, 20_000)
    assert forced[0] > 0


def test_the_shortlist_of_shared_texts(tiny_ensemble, monkeypatch):
    members = tiny_ensemble.members
    assert draft_shortlist(members, 1) is None  # tiny vocabs share most texts: no saving
    whole = draft_shortlist(members, 1, torch.bfloat16)  # in bfloat16: the whole layer
    assert whole is not None and whole.weight.dtype == torch.bfloat16
    assert whole.rows.tolist() == list(range(len(members[1].vocab)))
    members[1].output_layer.shortlists.clear()
    monkeypatch.setattr(main_drafts, "_MOST_ROWS", 1.0)
    head = draft_shortlist(members, 1)
    assert head is not None and draft_shortlist(members, 1) is head  # built once
    other = set(members[0].vocab.texts)
    sp = members[1]
    shared = {i for i, t in enumerate(sp.vocab.texts) if t is not None and t in other}
    extra = set(sp.vocab.byte_fallback_ids) | set(sp.eos_ids)
    extra |= {int(i) for i in sp.tokenizer.added_tokens_decoder}
    assert head.rows.tolist() == sorted(shared | extra)
    assert len(head.rows) < len(sp.vocab)
    members[1].output_layer.shortlists.clear()
