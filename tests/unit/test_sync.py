"""MemberState: cache rollback keeps logits equal to a fresh forward over the same ids."""

from __future__ import annotations

import random

import pytest
import torch

from deepen_engine import MemberSpec, load_member
from deepen_engine.sync import MemberState


def _fresh_logits(member, ids):
    with torch.inference_mode():
        return member.model(input_ids=torch.tensor([ids])).logits[:, -1].float()


@pytest.mark.parametrize("which", [0, 1], ids=["llama-bpe", "gemma3-sp-sliding"])
def test_helper_sync_matches_full_forward(tiny_pair, which):
    member = load_member(MemberSpec(source=tiny_pair[which], name=f"m{which}"))
    prompt_ids = member.tokenizer("Once upon a time", add_special_tokens=True).input_ids
    state = MemberState(member, prompt_ids)
    state.forward()
    rng = random.Random(which)
    # Pieces of one to a few characters: growing words re-merge, forcing rollbacks.
    source = "The capital of Italy is Rome. Zürich 東京\n  def add(a, b):"
    text = ""
    rolled_back = 0
    pos = 0
    while pos < len(source):  # longer than the tiny Gemma's sliding window of 6
        step = rng.randint(1, 3)
        text += source[pos : pos + step]
        pos += step
        before = list(state.ids)
        state.sync_text(text)
        expected_ids = prompt_ids + member.tokenizer(text, add_special_tokens=False).input_ids
        assert state.ids == expected_ids
        if before != expected_ids[: len(before)]:
            rolled_back += 1
        state.forward()
        assert state.cached == len(state.ids)
        expected = _fresh_logits(member, state.ids)
        torch.testing.assert_close(state.logits, expected, atol=1e-4, rtol=1e-4)
    assert rolled_back > 0, "the texts should have forced at least one cache rollback"


def test_main_append_feeds_one_position(tiny_pair):
    member = load_member(MemberSpec(source=tiny_pair[0], name="m"))
    state = MemberState(member, member.tokenizer("Hello there").input_ids)
    state.forward()
    for token in [300, 301, 302]:
        state.append(token)
        state.forward()
    assert state.fed_positions == 3
    assert state.generated_ids == [300, 301, 302]
    torch.testing.assert_close(state.logits, _fresh_logits(member, state.ids), atol=1e-4, rtol=1e-4)
