"""Long prompts are read in chunks (`SchedulerConfig.prefill_chunk`) with the same result
as in one pass, and a request can ask for `Progress` reports as its prompts are read and
its tokens chosen.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from deepen_engine import Ensemble, MemberSpec, SchedulerConfig
from deepen_engine.decoding.member_batch import MemberBatch
from deepen_engine.outputs import Progress
from tests.conftest import PLAIN, forward_module

PROMPTS = [
    "The capital of France is Paris. " * 6,  # longer than the tiny Gemma's window (6)
    "Q:",
    "Once upon a time there was a small model that learned to write stories.",
]


def _ensemble(tiny_pair, chunk: int) -> Ensemble:
    members = [
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
    ]
    scheduler = SchedulerConfig(prefill_chunk=chunk)
    return Ensemble(members, min_anchors=50, scheduler=scheduler, **PLAIN)


@pytest.fixture(scope="module")
def whole(tiny_pair):
    return _ensemble(tiny_pair, 0)


@pytest.fixture(scope="module")
def chunked(tiny_pair):
    return _ensemble(tiny_pair, 5)


def test_chunked_prefill_gives_the_same_logits(tiny_pair, whole):
    for member in whole.members:  # Llama, and Gemma-3 with a sliding window of 6
        ids = [member.tokenizer(p).input_ids for p in PROMPTS]
        one_pass, chunks = MemberBatch(member, ids), MemberBatch(member, ids)
        one_pass.chunk, chunks.chunk = 0, 5
        one_pass.forward()
        reports: list[tuple[int, int]] = []
        chunks.forward(lambda done, total, seen=reports: seen.append((done, total)))
        torch.testing.assert_close(chunks.logits, one_pass.logits, rtol=1e-5, atol=1e-5)
        total = sum(len(x) for x in ids)
        assert reports[-1] == (total, total)
        assert len(reports) == math.ceil(max(len(x) for x in ids) / 5)
        assert [r.cached for r in chunks.rows] == [len(x) for x in ids]


def test_chunked_prefill_gives_the_same_text(whole, chunked):
    plain = whole.generate(PROMPTS, max_new_tokens=12)
    in_chunks = chunked.generate(PROMPTS, max_new_tokens=12)
    assert [r.text for r in in_chunks] == [r.text for r in plain]
    assert [r.token_ids for r in in_chunks] == [r.token_ids for r in plain]
    assert [r.usage.fed_positions for r in in_chunks] == [r.usage.fed_positions for r in plain]


def test_no_forward_pass_is_wider_than_the_chunk(chunked):
    widths: list[int] = []
    for member in chunked.members:
        module = forward_module(member)
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            widths.append(int(kwargs["input_ids"].shape[1]))
            return _original(*args, **kwargs)

        module.forward = forward
    try:
        chunked.generate(PROMPTS, max_new_tokens=4)
    finally:
        for member in chunked.members:
            del forward_module(member).forward
    assert max(widths) == 5


def test_progress_reports_reading_and_generating(chunked):
    reports: list[Progress] = []
    events = list(chunked.stream(PROMPTS, max_new_tokens=6, progress=reports.append))
    quiet = list(chunked.stream(PROMPTS, max_new_tokens=6))
    assert [(e.index, e.delta, e.finish_reason) for e in events] == [
        (e.index, e.delta, e.finish_reason) for e in quiet
    ]
    finals = [e for e in events if e.finish_reason is not None]
    for member in chunked.members:
        read = [p for p in reports if p.stage == "prefill" and p.member == member.name]
        total = sum(e.usage.prompt_tokens[member.name] for e in finals)
        assert [p.total for p in read] == [total] * len(read)
        assert read[-1].done == total
        assert [p.done for p in read] == sorted(p.done for p in read)
    steps = [p for p in reports if p.stage == "generate"]
    assert [p.total for p in steps] == [3 * 6] * len(steps)
    assert [p.done for p in steps] == sorted(p.done for p in steps)
    assert steps[-1].done == sum(e.usage.completion_tokens for e in finals)
    assert reports.index(steps[0]) > max(reports.index(p) for p in reports if p.stage == "prefill")


def test_progress_in_asyncio(chunked):
    async def run() -> list[Progress]:
        reports: list[Progress] = []
        async for _ in chunked.astream("Q:", max_new_tokens=3, progress=reports.append):
            pass
        return reports

    reports = asyncio.run(run())
    assert {p.stage for p in reports} == {"prefill", "generate"}
    assert [p.done for p in reports if p.stage == "generate"][-1] >= 1
