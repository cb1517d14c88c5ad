"""Speculative drafts that cross a position whose text does not end on a boundary of the
helper's tokens (decoding/verification.py): the helper is re-synced there and the draft
is read on. On the tiny pair, drafts of the SentencePiece main member reach such
positions in these prompts' continuations (the byte-level helper merges what the main
member splits)."""

from __future__ import annotations

import pytest
import torch

from deepen_engine import GenerationConfig
from deepen_engine.config import METHODS
from deepen_engine.decoding import speculative
from tests.unit.test_speculative import _drive, _same, exact_logits

RESYNC_PROMPTS = ["Berli", "def add(a, b):\n    r", "Once upon a "]


def _resyncs(results) -> int:
    return sum(r.usage.resyncs for r in results)


@pytest.mark.parametrize("drafter", ["main", "lookup"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_equals_plain_decoding_across_resyncs(tiny_ensemble, method, drafter):
    view = tiny_ensemble.view({"method": method, "main": 1})
    base = view.generate(RESYNC_PROMPTS, max_new_tokens=24, speculate=0)
    assert _resyncs(base) == 0
    out = view.generate(RESYNC_PROMPTS, max_new_tokens=24, speculate=4, drafter=drafter)
    _same(base, out)
    assert _resyncs(out) > 0  # drafts were read on past a helper boundary


def test_a_resync_reads_what_a_fresh_forward_over_the_texts_ids_gives(tiny_ensemble, monkeypatch):
    """At every gap filled, the helper's logits equal its model's over its tokenisation of
    prompt + the text there; after each step and advance every member's logits equal a
    fresh forward over its ids, and rows joining mid-flight decode as they do alone."""
    filled = []
    resync = speculative.resync

    def checked_resync(reads, at):
        gaps = {b: t for b, t in at.items() if reads.logits[b][t] is None}
        resync(reads, at)
        member = reads.batch.member
        for b, t in gaps.items():
            ids = reads.plans[b][t - 1][0]
            text = speculative_texts[id(reads)][b][t]
            prompt = reads.batch.rows[b].prompt_ids
            tail = member.tokenizer(text, add_special_tokens=False).input_ids
            assert ids == prompt + tail
            with torch.inference_mode():
                fresh = member.model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(reads.logits[b][t], fresh.float(), atol=1e-4, rtol=1e-4)
            filled.append(t)

    speculative_texts: dict[int, list[list[str]]] = {}
    read = speculative.read_drafts

    def reading(batch, drafts, drafted):
        reads = read(batch, drafts, drafted)
        speculative_texts[id(reads)] = [d.texts for d in drafts]
        return reads

    monkeypatch.setattr(speculative, "resync", checked_resync)
    monkeypatch.setattr(speculative, "read_drafts", reading)
    checked = []

    def check(decoder):
        decoder.speculator.catch_up()
        for batch in decoder.batches:
            for b, row in enumerate(batch.rows):
                with torch.inference_mode():
                    fresh = batch.member.model(input_ids=torch.tensor([row.ids])).logits[0, -1]
                logits = exact_logits(batch, b)  # fed again where the draft body fed it
                torch.testing.assert_close(logits, fresh.float(), atol=1e-4, rtol=1e-4)
                checked.append(b)

    view = tiny_ensemble.view({"main": 1})
    configs = [GenerationConfig(max_new_tokens=20, speculate=k) for k in (4, 8, 2)]
    ids = _drive(view, {0: [0, 1], 3: [2]}, configs, check, prompts=RESYNC_PROMPTS)
    assert len(filled) > 0 and len(checked) > 10
    for p, got in ids.items():
        plain = configs[p].model_copy(update={"speculate": 0})
        assert got == view.generate(RESYNC_PROMPTS[p], plain).token_ids


def test_sampled_output_equals_plain_sampling_across_resyncs(tiny_ensemble):
    """Seeded sampled rows give the very tokens they give without speculation."""
    view = tiny_ensemble.view({"main": 1})
    settings = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 3}
    outputs, resyncs = set(), 0
    for seed in range(24):
        base = view.generate(RESYNC_PROMPTS, seed=seed, speculate=0, **settings)
        out = view.generate(RESYNC_PROMPTS, seed=seed, speculate=4, **settings)
        _same(base, out)
        resyncs += _resyncs(out)
        outputs.update(tuple(r.token_ids) for r in base)
    assert resyncs > 0 and len(outputs) >= 20
