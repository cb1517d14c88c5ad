"""The decoding loop on tiny members: eta=0 is the main member alone, EOS, stop strings,
length, streaming equals generate, fusion changes the output."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from deepen_engine import ConfigError, Usage
from tests.conftest import PLAIN, plain_greedy_ids

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]


def _plain_greedy(member, prompt, n):
    return plain_greedy_ids(member.model, member.tokenizer(prompt).input_ids, n)


@contextmanager
def _main_ends_on(ens, token):
    """The main member treats `token` as its only end token for the block."""
    main = ens.members[ens.fusion.main]
    original = main.eos_ids
    main.eos_ids = frozenset({token})
    try:
        yield
    finally:
        main.eos_ids = original


@pytest.mark.parametrize("main", [0, 1], ids=["main-llama", "main-gemma3-sliding"])
def test_eta_zero_is_main_member_alone(tiny_ensemble, main):
    ens = tiny_ensemble.with_fusion(main=main, eta=0)
    member = ens.members[main]
    member_eos = member.eos_ids
    for prompt in PROMPTS:
        result = ens.generate(prompt, max_new_tokens=16)
        expected = _plain_greedy(member, prompt, 16)
        if result.finish_reason == "eos":
            cut = next(i for i, t in enumerate(expected) if t in member_eos)
            assert result.token_ids == expected[:cut]
        else:
            assert result.token_ids == expected
        assert result.text == member.tokenizer.decode(result.token_ids)


def test_eta_zero_runs_only_the_main_member(tiny_ensemble):
    result = tiny_ensemble.with_fusion(eta=0).generate(PROMPTS[0], max_new_tokens=8)
    assert list(result.usage.fed_positions) == ["tiny-llama"]


def test_fusion_changes_some_output(tiny_ensemble):
    alone = [tiny_ensemble.with_fusion(eta=0).generate(p, max_new_tokens=12).text for p in PROMPTS]
    fused = [tiny_ensemble.generate(p, max_new_tokens=12).text for p in PROMPTS]
    assert alone != fused


def test_every_member_feeds_about_one_position_per_token(tiny_ensemble):
    # standard steps: a speculative step also feeds drafted positions it may roll back
    result = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=24, speculate=0)
    assert set(result.usage.fed_positions) == {"tiny-llama", "tiny-gemma"}
    assert result.usage.fed_positions["tiny-llama"] == result.usage.completion_tokens - 1
    assert result.usage.prompt_tokens["tiny-llama"] == len(
        tiny_ensemble.members[0].tokenizer(PROMPTS[0]).input_ids
    )


def test_length_finish(tiny_ensemble):
    result = tiny_ensemble.generate(PROMPTS[1], max_new_tokens=5)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 5
    assert len(result.token_ids) == 5


def test_eos_ends_generation(tiny_ensemble):
    free = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=10)
    eos = free.token_ids[3]
    with _main_ends_on(tiny_ensemble, eos):
        result = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=10)
    first = free.token_ids.index(eos)
    assert result.finish_reason == "eos"
    assert result.token_ids == free.token_ids[:first]
    assert result.usage.completion_tokens == first + 1


def test_min_new_tokens_masks_end_tokens_until_reached(tiny_ensemble):
    free = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=10)
    eos = free.token_ids[3]
    with _main_ends_on(tiny_ensemble, eos):
        held = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=10, min_new_tokens=10)
    first = free.token_ids.index(eos)
    assert held.finish_reason == "length"
    assert held.token_ids[:first] == free.token_ids[:first]
    assert eos not in held.token_ids
    assert len(held.token_ids) == 10


def test_min_new_tokens_above_max_is_refused(tiny_ensemble):
    with pytest.raises(
        ConfigError, match=r"min_new_tokens \(9\) must not exceed max_new_tokens \(4\)"
    ):
        tiny_ensemble.generate(PROMPTS[0], max_new_tokens=4, min_new_tokens=9)


def test_stop_string_cuts_text(tiny_ensemble):
    free = tiny_ensemble.generate(PROMPTS[2], max_new_tokens=20)
    stop = free.text[5:8]
    assert stop.strip(), "pick a visible stop string"
    result = tiny_ensemble.generate(PROMPTS[2], max_new_tokens=20, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]


def test_stream_concatenation_equals_generate(tiny_ensemble):
    for prompt in PROMPTS:
        whole = tiny_ensemble.generate(prompt, max_new_tokens=20)
        events = list(tiny_ensemble.stream(prompt, max_new_tokens=20))
        assert events[-1].finish_reason == whole.finish_reason
        assert all(e.finish_reason is None for e in events[:-1])
        assert "".join(e.delta for e in events) == whole.text
        assert events[-1].token_ids == whole.token_ids


def test_bad_requests(tiny_ensemble):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        tiny_ensemble.generate("hi", max_new_tokens=0)
    with pytest.raises(ConfigError, match="stop"):
        tiny_ensemble.generate("hi", stop=[""])
    with pytest.raises(ConfigError, match="prompt must be a str"):
        tiny_ensemble.generate(123)
    with pytest.raises(ConfigError, match="at position 1"):
        tiny_ensemble.generate(["hi", 7])
    with pytest.raises(ConfigError, match="temperature"):
        tiny_ensemble.generate("hi", temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        tiny_ensemble.generate("hi", top_p=1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        tiny_ensemble.generate(["hi"], batch_size=0)


BATCH_PROMPTS = [
    "Q:",
    "The capital of France is",
    "Once upon a time there was a small model that learned to write stories. It",
    "def add(a, b):\n    return",
    "Zürich, Genève and Malmö",
    "x " * 40,
]


@pytest.mark.parametrize("main", [0, 1], ids=["main-llama", "main-gemma3"])
def test_batched_greedy_equals_each_prompt_alone(tiny_ensemble, main):
    ens = tiny_ensemble.with_fusion(main=main)
    alone = [ens.generate(p, max_new_tokens=24) for p in BATCH_PROMPTS]
    for size in (6, 4):
        batched = ens.generate(BATCH_PROMPTS, max_new_tokens=24, batch_size=size)
        assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
        assert [r.text for r in batched] == [r.text for r in alone]
        assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]


def test_batched_stop_and_length_rows_finish_independently(tiny_ensemble):
    free = tiny_ensemble.generate(BATCH_PROMPTS[1], max_new_tokens=20)
    stop = free.text[4:7]
    results = tiny_ensemble.generate(BATCH_PROMPTS[:3], max_new_tokens=20, stop=[stop])
    assert results[1].finish_reason == "stop"
    assert results[1].text == free.text[: free.text.index(stop)]
    for i in (0, 2):
        alone = tiny_ensemble.generate(BATCH_PROMPTS[i], max_new_tokens=20, stop=[stop])
        assert results[i].token_ids == alone.token_ids


def test_batched_stream_matches_generate(tiny_ensemble):
    results = tiny_ensemble.generate(BATCH_PROMPTS, max_new_tokens=16)
    parts = {i: [] for i in range(len(BATCH_PROMPTS))}
    finals = {}
    for event in tiny_ensemble.stream(BATCH_PROMPTS, max_new_tokens=16):
        assert event.index not in finals, "no delta after a row's final event"
        parts[event.index].append(event.delta)
        if event.finish_reason:
            finals[event.index] = event
    assert ["".join(parts[i]) for i in range(len(BATCH_PROMPTS))] == [r.text for r in results]
    assert sorted(finals) == list(range(len(BATCH_PROMPTS)))


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_ensemble):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    first = tiny_ensemble.generate(PROMPTS[0], seed=1, **kwargs)
    again = tiny_ensemble.generate(PROMPTS[0], seed=1, **kwargs)
    other = tiny_ensemble.generate(PROMPTS[0], seed=2, **kwargs)
    greedy = tiny_ensemble.generate(PROMPTS[0], max_new_tokens=16)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids != greedy.token_ids


def test_seeded_row_is_the_same_in_any_batch_position(tiny_ensemble):
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    alone = tiny_ensemble.generate(PROMPTS[1], **kwargs)
    batched = tiny_ensemble.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], **kwargs)
    assert batched[2].token_ids == alone.token_ids


def test_members_on_distinct_devices_run_concurrently_with_the_same_result(tiny_pair, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from deepen_engine import Ensemble, MemberSpec
    from deepen_engine.decoding import loop

    specs = [
        MemberSpec(source=tiny_pair[0], name="a", device="cpu"),
        MemberSpec(source=tiny_pair[1], name="b", device="cpu:0"),  # a distinct device name
    ]
    ens = Ensemble(specs, min_anchors=50, **PLAIN)  # main="auto" would add a scoring pool
    used = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            used.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "ThreadPoolExecutor", Recording)
        parallel = ens.generate(BATCH_PROMPTS[:3], max_new_tokens=12)
    same_device = Ensemble(
        [MemberSpec(source=tiny_pair[0], name="a"), MemberSpec(source=tiny_pair[1], name="b")],
        min_anchors=50,
        **PLAIN,
    ).generate(BATCH_PROMPTS[:3], max_new_tokens=12)
    assert used == [2]
    assert [r.token_ids for r in parallel] == [r.token_ids for r in same_device]


def test_closing_a_stream_early_frees_and_leaves_the_ensemble_usable(tiny_ensemble, monkeypatch):
    from deepen_engine.decoding.member_batch import MemberBatch

    created = []
    original = MemberBatch.free

    def recording_free(self):
        created.append(self.member.name)
        original(self)

    with monkeypatch.context() as patch:
        patch.setattr(MemberBatch, "free", recording_free)
        stream = tiny_ensemble.stream(BATCH_PROMPTS[:2], max_new_tokens=30)
        first = next(e for e in stream if e.delta)
        stream.close()
    assert first.delta
    assert set(created) == {"tiny-gemma", "tiny-llama"}  # both members' caches freed
    after = tiny_ensemble.generate(BATCH_PROMPTS[:2], max_new_tokens=12)
    fresh = [tiny_ensemble.generate(p, max_new_tokens=12) for p in BATCH_PROMPTS[:2]]
    assert [r.token_ids for r in after] == [r.token_ids for r in fresh]


def test_concurrent_threads_get_their_own_results(tiny_ensemble):
    from concurrent.futures import ThreadPoolExecutor

    prompts = BATCH_PROMPTS * 2  # each prompt twice, concurrently; its sequential result once
    expected = [tiny_ensemble.generate(p, max_new_tokens=10).token_ids for p in BATCH_PROMPTS] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: tiny_ensemble.generate(p, max_new_tokens=10), prompts))
    assert [r.token_ids for r in got] == expected


def test_astream_does_not_block_the_event_loop_and_matches_generate(tiny_ensemble):
    import asyncio

    expected = tiny_ensemble.generate(BATCH_PROMPTS[:3], max_new_tokens=16)

    async def main():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        results = await tiny_ensemble.agenerate(BATCH_PROMPTS[:3], max_new_tokens=16)
        deltas = [
            d async for d in _deltas(tiny_ensemble.astream(BATCH_PROMPTS[2], max_new_tokens=16))
        ]
        done = True
        await task
        return results, "".join(deltas), ticks

    async def _deltas(stream):
        async for event in stream:
            yield event.delta

    results, streamed, ticks = asyncio.run(main())
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert streamed == expected[2].text
    assert ticks > 5  # the ticker kept running while the ensemble generated


def test_cancelled_astream_leaves_the_ensemble_usable(tiny_ensemble):
    import asyncio

    async def main():
        async def consume():
            async for _ in tiny_ensemble.astream(BATCH_PROMPTS[2], max_new_tokens=200):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return await tiny_ensemble.agenerate(BATCH_PROMPTS[0], max_new_tokens=8)

    result = asyncio.run(main())
    assert result.token_ids == tiny_ensemble.generate(BATCH_PROMPTS[0], max_new_tokens=8).token_ids


def test_prompt_longer_than_a_members_context_is_refused(tiny_ensemble):
    long_prompt = "the capital of " * 600  # the tiny members hold 1024 positions
    with pytest.raises(ConfigError, match=r"Prompt 1 is \d+ tokens long in member 'tiny-llama'"):
        tiny_ensemble.generate(["Hi", long_prompt], max_new_tokens=4)
    assert tiny_ensemble.generate("Hi", max_new_tokens=4).finish_reason == "length"


def test_usage_token_counts_use_the_main_members_prompt(tiny_ensemble):
    result = tiny_ensemble.generate("The capital of France is", max_new_tokens=5, min_new_tokens=5)
    main = tiny_ensemble.main.name
    counts = result.usage.token_counts(main)
    assert counts == {
        "prompt_tokens": result.usage.prompt_tokens[main],
        "completion_tokens": 5,
        "total_tokens": result.usage.prompt_tokens[main] + 5,
    }
    # the row's leader counts, whatever main the caller names (main="auto": its own)
    assert result.usage.token_counts("no such member") == counts
    assert Usage().token_counts("no such member")["prompt_tokens"] == 0


def test_logprobs_are_the_fused_distributions(tiny_ensemble):
    import torch

    prompt = PROMPTS[0]
    result = tiny_ensemble.generate(prompt, max_new_tokens=6, min_new_tokens=6, logprobs=3)
    entries = result.logprobs
    assert [e.id for e in entries] == result.token_ids  # one per token, in order
    for e in entries:
        assert e.logprob == e.top[0].logprob  # greedy: the chosen token is the most likely
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert len(e.top) == 3 and bytes(e.bytes).decode("utf-8", "replace") == e.token
    # with eta 0 the fused distribution is the main member's own: check the first token
    alone = tiny_ensemble.with_fusion(eta=0)
    first = alone.generate(prompt, max_new_tokens=1, logprobs=0).logprobs[0]
    main = alone.members[0]
    ids = torch.tensor([main.tokenizer(prompt).input_ids])
    with torch.no_grad():
        expected = torch.log_softmax(main.model(input_ids=ids).logits[0, -1].float(), -1)
    assert first.id == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert first.top == []  # logprobs=0: the chosen token only
    # streamed logprobs add up to the same list; without the setting there are none
    events = tiny_ensemble.stream(prompt, max_new_tokens=6, min_new_tokens=6, logprobs=3)
    streamed = [e for event in events for e in (event.logprobs or [])]
    assert [(e.id, e.logprob) for e in streamed] == [(e.id, e.logprob) for e in entries]
    assert tiny_ensemble.generate(prompt, max_new_tokens=2).logprobs is None
