"""MemberBatch: after rollbacks, holes, compaction and dropped rows, every row's logits
equal a fresh forward over that row's ids alone."""

from __future__ import annotations

import random

import pytest
import torch

from deepen_engine import MemberSpec, load_member
from deepen_engine.decoding.member_batch import MemberBatch
from tests.conftest import tiny_gemma3

SOURCES = [
    "The capital of Italy is Rome. Zürich 東京\n  def add(a, b):",
    "Q: What is 3 * 4?\nA: 12. Once upon a time there was a small model",
    "x",
]
PROMPTS = ["Once upon a time", "Q:", "The quick brown fox jumps over the lazy dog. Stop here."]


def _fresh_logits(member, ids):
    with torch.inference_mode():
        return member.model(input_ids=torch.tensor([ids])).logits[:, -1].float()


def _member(tiny_pair, which):
    if which == 2:  # a window the cache crosses mid-test: holes first, then no holes
        tokenizer = tiny_pair[1][1]
        pair = (tiny_gemma3(len(tokenizer), sliding_window=24), tokenizer)
        return load_member(MemberSpec(source=pair, name="gemma-window-24"))
    return load_member(MemberSpec(source=tiny_pair[which], name=f"m{which}"))


@pytest.mark.parametrize(
    "which", [0, 1, 2], ids=["llama-bpe", "gemma3-sp-window-6", "gemma3-sp-window-24"]
)
def test_batched_helper_sync_matches_each_row_alone(tiny_pair, which):
    member = _member(tiny_pair, which)
    prompt_ids = [member.tokenizer(p, add_special_tokens=True).input_ids for p in PROMPTS]
    batch = MemberBatch(member, prompt_ids)
    batch.forward()
    rng = random.Random(which)
    texts = ["", "", ""]
    positions = [0, 0, 0]
    rolled_back = 0
    for _ in range(30):  # longer than the tiny Gemma's sliding window of 6
        for b in range(3):
            # Pieces of one to a few characters: growing words re-merge, forcing rollbacks.
            step = rng.randint(0, 3)
            texts[b] += SOURCES[b][positions[b] : positions[b] + step]
            positions[b] += step
            before = list(batch.rows[b].ids)
            batch.sync_text(b, texts[b])
            expected = (
                prompt_ids[b] + member.tokenizer(texts[b], add_special_tokens=False).input_ids
            )
            assert batch.rows[b].ids == expected
            rolled_back += before != expected[: len(before)]
        batch.forward()
        for b in range(3):
            expected = _fresh_logits(member, batch.rows[b].ids)[0]
            torch.testing.assert_close(batch.logits[b], expected, atol=1e-4, rtol=1e-4)
    assert rolled_back > 0, "the texts should have forced at least one cache rollback"


def test_main_append_feeds_one_position_per_token(tiny_pair):
    member = _member(tiny_pair, 0)
    prompts = [member.tokenizer(p).input_ids for p in PROMPTS]
    batch = MemberBatch(member, prompts)
    batch.forward()
    for step in range(3):
        for b in range(3):
            batch.append(b, 300 + step + b)
        batch.forward()
    assert [r.fed_positions for r in batch.rows] == [3, 3, 3]
    assert batch.rows[1].generated_ids == [301, 302, 303]
    for b in range(3):
        expected = _fresh_logits(member, batch.rows[b].ids)[0]
        torch.testing.assert_close(batch.logits[b], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", [0, 1], ids=["llama-bpe", "gemma3-sp-sliding"])
def test_dropping_rows_keeps_the_others_exact(tiny_pair, which):
    member = _member(tiny_pair, which)
    prompts = [member.tokenizer(p).input_ids for p in PROMPTS]
    batch = MemberBatch(member, prompts)
    batch.forward()
    batch.keep_rows([2, 0])
    assert [r.prompt_ids for r in batch.rows] == [prompts[2], prompts[0]]
    for step in range(8):
        batch.append(0, 40 + step)
        batch.append(1, 50 + step)
        batch.forward()
    for b in range(2):
        expected = _fresh_logits(member, batch.rows[b].ids)[0]
        torch.testing.assert_close(batch.logits[b], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "which", [0, 1, 2], ids=["llama-bpe", "gemma3-sp-window-6", "gemma3-sp-window-24"]
)
def test_rows_joining_and_leaving_keep_the_cache_to_the_live_rows(tiny_pair, which):
    """A batch that never empties (a busy server's): rows leave and new rows merge in for
    many steps. The cache holds no slot before the oldest live row's first one, so its
    width stays bounded by the live rows, and every row's logits stay exact.
    """
    member = _member(tiny_pair, which)
    encode = member.tokenizer
    batch = MemberBatch(member, [encode(PROMPTS[0]).input_ids])
    batch.forward()
    widths = []
    for step in range(24):
        for b in range(len(batch.rows)):
            batch.append(b, 40 + (step + b) % 20)
        if step % 3 == 2:  # a new row joins, prefilled apart, as the scheduler does
            newcomer = MemberBatch(member, [encode(PROMPTS[step % 3]).input_ids])
            newcomer.forward()
            batch.merge(newcomer)
        if len(batch.rows) > 2:  # the oldest row finishes
            batch.keep_rows(list(range(1, len(batch.rows))))
        batch.forward()
        widths.append(batch.valid.shape[1])
        # no slot before the first one a live row uses
        assert bool(batch.valid[:, 0].any())
        for layer in batch.cache.layers:
            assert layer.keys.shape[2] == batch.valid.shape[1]
    for b in range(len(batch.rows)):
        expected = _fresh_logits(member, batch.rows[b].ids)[0]
        torch.testing.assert_close(batch.logits[b], expected, atol=1e-4, rtol=1e-4)
    # before, the width only grew: the first prompt plus a slot per step
    assert widths[-1] < 24 + len(encode(PROMPTS[0]).input_ids)
