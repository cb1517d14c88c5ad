"""Property: a helper's incrementally synced ids equal a full tokenisation of its text,
over many random texts grown in random pieces (seeded), for both tokenizer kinds."""

from __future__ import annotations

import random

import pytest

from deepen_engine import MemberSpec, load_member
from deepen_engine.decoding import text_sync
from deepen_engine.decoding.member_batch import MemberBatch

PIECES = [
    "the", " the", " of", "  ", "   ", "\n", "\n\n", " \n", "Paris", ",", ".", "!", "?", "123",
    " 4567", "ü", " Zürich", "東京", "😀", "<", ">", "</", "> </", "don't", "'s", "\t", "x",
    " x", "(", "):", "    return", "a+b", "--", "...", " é", "ß", "-", "_", "=", "==",
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.8:
            parts.append(rng.choice(PIECES))
        else:
            parts.append(chr(rng.randint(32, 126)))
    return "".join(parts)


def _recording(safe_cut, cuts: list[int]):
    def wrapped(texts, generated: list[int]) -> int:
        cuts.append(safe_cut(texts, generated))
        return cuts[-1]

    return wrapped


def check_incremental_equals_full(member, seeds: range) -> tuple[int, int]:
    """Grow random texts in random pieces; assert ids after each sync.

    Returns (syncs run, syncs that re-tokenised only a tail).
    """
    syncs = 0
    cuts: list[int] = []
    safe_cut = text_sync.safe_cut
    text_sync.safe_cut = _recording(safe_cut, cuts)
    try:
        for seed in seeds:
            syncs += _grow(member, seed)
    finally:
        text_sync.safe_cut = safe_cut
    tails = sum(1 for c in cuts if c > 0)
    return syncs, tails


def _grow(member, seed: int) -> int:
    """One seeded random text grown piece by piece; asserts the ids after each sync and
    returns the syncs run.
    """
    syncs = 0
    rng = random.Random(seed)
    text = random_text(rng)
    prompt = member.tokenizer("Prompt:", add_special_tokens=True).input_ids
    batch = MemberBatch(member, [prompt])
    pos = 0
    while pos < len(text):
        pos = min(len(text), pos + rng.randint(1, 6))
        batch.sync_text(0, text[:pos])
        full = member.tokenizer(text[:pos], add_special_tokens=False).input_ids
        assert batch.rows[0].ids == prompt + full, (seed, text[:pos])
        syncs += 1
    return syncs


@pytest.mark.parametrize("which", [0, 1], ids=["byte-level-bpe", "sentencepiece-bpe"])
def test_incremental_sync_equals_full_tokenisation(tiny_pair, which):
    member = load_member(MemberSpec(source=tiny_pair[which], name="m"))
    syncs, tails = check_incremental_equals_full(member, range(300))
    assert syncs > 1000
    assert tails > syncs // 4  # the tail window is really used, not only full re-encodes
