"""Continuous batching on tiny members: rows joining a running batch at different steps,
concurrent requests sharing forward passes, per-row settings, queue and timeout limits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepen_engine import (
    ConfigError,
    Ensemble,
    GenerationConfig,
    MemberSpec,
    QueueFullError,
    RequestTimeoutError,
    SchedulerConfig,
)
from deepen_engine.decoding.loop import BatchDecoder
from deepen_engine.decoding.rows import NewRow
from tests.conftest import IDLE

PROMPTS = [
    "The capital of France is",
    "Q: What is 12 + 7?\nA:",
    "def add(a, b):",
    "Once upon a time there was",
    "Berlin is the capital of",
    "The quick brown fox",
]


def _alone(ens, prompt, **settings):
    return ens.generate(prompt, **settings).token_ids


def test_rows_joining_at_different_steps_equal_each_alone(tiny_ensemble):
    """Drive a BatchDecoder by hand: rows join after 0, 2 and 5 steps and leave when done."""
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    fuser = tiny_ensemble.fuser
    decoder = BatchDecoder(tiny_ensemble.members, fuser.main)
    joins = {0: [0, 1], 2: [2], 5: [3, 4]}  # step -> prompts joining before it
    ids: dict[int, list[int]] = {}
    try:
        for step in range(40):
            if step in joins:
                new = [
                    NewRow(prompts=[(PROMPTS[p], True)] * 2, config=config, fuser=fuser, index=p)
                    for p in joins[step]
                ]
                decoder.join(decoder.prepare(new))
            if not decoder.rows:
                break
            for _, event in decoder.step():
                if event.finish_reason is not None:
                    ids[event.index] = event.token_ids
            if decoder.rows:
                decoder.advance()
    finally:
        decoder.close()
    assert sorted(ids) == [0, 1, 2, 3, 4]
    for p, got in ids.items():
        assert got == _alone(tiny_ensemble, PROMPTS[p], max_new_tokens=12, min_new_tokens=12)


def test_concurrent_requests_share_steps_and_equal_their_solo_outputs(tiny_ensemble, monkeypatch):
    expected = {p: _alone(tiny_ensemble, p, max_new_tokens=10) for p in PROMPTS}
    widths: list[int] = []
    step = BatchDecoder.step

    def recording_step(self):
        widths.append(len(self.rows))
        return step(self)

    monkeypatch.setattr(BatchDecoder, "step", recording_step)
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        futures = {p: pool.submit(tiny_ensemble.generate, p, max_new_tokens=10) for p in PROMPTS}
        got = {p: f.result().token_ids for p, f in futures.items()}
    assert got == expected
    assert max(widths) > 1  # requests really shared forward passes


def test_different_fusion_settings_share_a_batch_row_by_row(tiny_ensemble):
    views = [tiny_ensemble.with_fusion(eta=eta) for eta in (0.15, 0.6, 2.0)]
    expected = [_alone(v, PROMPTS[0], max_new_tokens=10) for v in views]
    assert len({tuple(e) for e in expected}) > 1  # the settings do change the output here
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(v.generate, PROMPTS[0], max_new_tokens=10) for v in views]
        assert [f.result().token_ids for f in futures] == expected


def test_requests_with_other_main_members_or_identity_fusion_wait_their_turn(tiny_ensemble):
    views = [
        tiny_ensemble,
        tiny_ensemble.with_fusion(main=1),
        tiny_ensemble.with_fusion(eta=0),
        tiny_ensemble.with_fusion(main=1, eta=0),
    ]
    expected = [_alone(v, PROMPTS[1], max_new_tokens=8) for v in views]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(v.generate, PROMPTS[1], max_new_tokens=8) for v in views]
        assert [f.result().token_ids for f in futures] == expected


def test_a_request_waiting_for_another_main_member_is_not_overtaken(tiny_ensemble):
    """First come, first served across batch keys: a request for another main member waits
    for the running batch to drain, and later requests for the running member wait behind
    it (they used to join the running batch at once, so under steady load the batch never
    drained and the other request waited past any timeout: the soak of issue 23)."""
    other = tiny_ensemble.with_fusion(main=1)
    expected = {
        "other main": _alone(other, PROMPTS[1], max_new_tokens=4),
        "same main": _alone(tiny_ensemble, PROMPTS[2], max_new_tokens=4),
    }
    order: list[str] = []
    got: dict[str, list[int]] = {}

    def read(name: str, ens: Ensemble, prompt: str) -> None:
        events = ens.stream(prompt, max_new_tokens=4)
        first = next(events)
        order.append(name)
        got[name] = [e for e in [first, *events] if e.finish_reason is not None][0].token_ids

    def wait_for(waiting: int) -> None:
        deadline = time.monotonic() + 10
        while tiny_ensemble.queue_state()["waiting_requests"] < waiting:
            if time.monotonic() > deadline:
                return  # the assertions below say what happened instead
            time.sleep(0.01)

    running = tiny_ensemble.stream(PROMPTS[0], max_new_tokens=400, min_new_tokens=400)
    next(running)  # a long row of main member 0 runs
    with ThreadPoolExecutor(max_workers=2) as pool:
        b = pool.submit(read, "other main", other, PROMPTS[1])
        wait_for(1)
        c = pool.submit(read, "same main", tiny_ensemble, PROMPTS[2])
        wait_for(2)  # before the fix "same main" joined the running batch instead
        running.close()  # the batch drains: the oldest waiting request's member leads next
        b.result(timeout=60)
        c.result(timeout=60)
    assert order == ["other main", "same main"]
    assert got == expected


def test_sampled_seeded_rows_do_not_depend_on_their_neighbours(tiny_ensemble):
    settings = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    expected = _alone(tiny_ensemble, PROMPTS[2], **settings)
    with ThreadPoolExecutor(max_workers=4) as pool:
        others = [pool.submit(tiny_ensemble.generate, p, max_new_tokens=10) for p in PROMPTS[:3]]
        mine = pool.submit(tiny_ensemble.generate, PROMPTS[2], **settings)
        assert mine.result().token_ids == expected
        [f.result() for f in others]


@pytest.fixture
def small_queue(tiny_pair):
    members = [MemberSpec(source=tiny_pair[0], name="l"), MemberSpec(source=tiny_pair[1], name="g")]
    limits = SchedulerConfig(max_batch_size=1, max_queue=1)
    ens = Ensemble(members, min_anchors=50, scheduler=limits)
    yield ens
    ens.close()


def test_a_full_queue_refuses_at_once_and_the_rest_is_served(small_queue):
    ens = small_queue
    running = ens.stream(PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
    next(running)  # one row runs (max_batch_size 1)
    waiting = ens.stream(PROMPTS[1], max_new_tokens=4)
    started = threading.Event()

    def read_waiting():
        started.set()
        return list(waiting)

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read_waiting)
        started.wait()
        deadline = time.monotonic() + 5
        while ens.queue_state()["waiting_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(QueueFullError, match=r"max_queue=1\); retry later"):
            ens.generate(PROMPTS[2], max_new_tokens=4)
        assert time.monotonic() - start < 1.0  # at once, not after a wait
        running.close()  # frees the running row: the waiting request now runs
        events = future.result(timeout=30)
    assert events[-1].token_ids == _alone(ens, PROMPTS[1], max_new_tokens=4)


def test_a_request_past_its_timeout_fails_and_leaves_the_batch(small_queue):
    ens = small_queue
    with pytest.raises(RequestTimeoutError, match="timeout of 0.05 s"):
        ens.generate(PROMPTS[0], max_new_tokens=1000, min_new_tokens=1000, timeout=0.05)
    assert ens.queue_state() == IDLE
    assert ens.generate(PROMPTS[1], max_new_tokens=4).token_ids == _alone(
        ens, PROMPTS[1], max_new_tokens=4
    )
    with pytest.raises(ConfigError, match="timeout"):
        ens.generate(PROMPTS[1], timeout=0)


def test_a_bad_prompt_fails_alone_while_others_run(tiny_ensemble):
    long_prompt = "the river runs " * 400  # past the tiny members' 1024 positions
    expected = _alone(tiny_ensemble, PROMPTS[0], max_new_tokens=10)
    with ThreadPoolExecutor(max_workers=2) as pool:
        good = pool.submit(tiny_ensemble.generate, PROMPTS[0], max_new_tokens=10)
        bad = pool.submit(tiny_ensemble.generate, long_prompt, max_new_tokens=10)
        with pytest.raises(ConfigError, match="truncation='left'"):
            bad.result()
        assert good.result().token_ids == expected


def test_a_closed_ensemble_refuses_new_requests(tiny_pair):
    members = [MemberSpec(source=tiny_pair[0], name="l"), MemberSpec(source=tiny_pair[1], name="g")]
    ens = Ensemble(members, min_anchors=50)
    ens.generate(PROMPTS[0], max_new_tokens=2)
    ens.close()
    with pytest.raises(ConfigError, match="closed"):
        ens.generate(PROMPTS[0], max_new_tokens=2)


def test_concurrent_adapter_calls_share_forward_passes(tiny_ensemble, monkeypatch):
    import asyncio

    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from deepen_integrations.langchain import DeepEnLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    widths: list[int] = []
    step = BatchDecoder.step

    def recording_step(self):
        widths.append(len(self.rows))
        return step(self)

    expected = [tiny_ensemble.generate(p, max_new_tokens=8).text for p in PROMPTS]  # one by one
    monkeypatch.setattr(BatchDecoder, "step", recording_step)
    langchain = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=8)
    llama = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=8, main=0)

    async def main():
        calls = [langchain.ainvoke(p) for p in PROMPTS[:3]]
        calls += [llama.acomplete(p) for p in PROMPTS[3:]]
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert [a if isinstance(a, str) else a.text for a in answers] == expected
    assert max(widths) > 1  # the six calls shared forward passes


def test_queue_state_counts_the_running_rows_kv_cache_bytes(tiny_ensemble):
    """`kv_cache_bytes` (the server's `deepen_kv_cache_bytes`) is what the running batch's
    caches hold: a row's per-position states of every member, nothing once it is done."""
    assert tiny_ensemble.queue_state()["kv_cache_bytes"] == 0
    running = tiny_ensemble.stream(PROMPTS[0], max_new_tokens=400, min_new_tokens=400)
    next(running)
    held = tiny_ensemble.queue_state()["kv_cache_bytes"]
    running.close()
    prompt_states = 0  # (k and v) x layers x kv heads x head dim x 4 bytes x prompt ids
    for member in tiny_ensemble.members:
        c = member.model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        ids = len(member.tokenizer(PROMPTS[0]).input_ids)
        prompt_states += 2 * c.num_hidden_layers * heads * dim * 4 * ids
    assert held >= prompt_states  # the row keeps decoding while we read: at least this
    assert tiny_ensemble.queue_state()["kv_cache_bytes"] == 0


def test_finished_requests_leave_no_rows_for_the_garbage_collector(tiny_ensemble):
    """A finished, closed or timed-out request is freed by reference counting alone: its
    rows named it as owner and it held them, a cycle that kept every finished request's
    rows (with `main="auto"`, their own fusers) until a full collection, which a busy
    server reached rarely (its memory rose by gigabytes, then fell at once)."""
    import gc

    from deepen_engine.decoding.rows import NewRow

    def rows_alive() -> int:
        return sum(type(o) is NewRow for o in gc.get_objects())

    gc.collect()
    gc.disable()  # cycles stay where the test can count them
    try:
        before = rows_alive()
        tiny_ensemble.generate(PROMPTS[:3], max_new_tokens=4)
        stream = tiny_ensemble.stream(PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
        next(stream)
        stream.close()  # the reader leaves mid-way
        with pytest.raises(RequestTimeoutError):
            long = {"max_new_tokens": 400, "min_new_tokens": 400}
            tiny_ensemble.generate(PROMPTS[1], timeout=0.05, **long)
        deadline = time.monotonic() + 10
        while tiny_ensemble.queue_state()["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows_alive() == before
    finally:
        gc.enable()
