"""Reliability, a member that fails mid-request (its forward pass raises once): the request
fails with `MemberError` naming the member (the member's exception is its cause), what was
streamed before is correct, every cache is freed, the ensemble is released, and the next
request gives exactly the text it gives on a fresh ensemble."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest

from deepen_engine import DeepenError, Ensemble, MemberError, MemberSpec
from deepen_engine.decoding import member_batch as sync
from tests.conftest import IDLE, forward_module

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
N = 6


class Boom(RuntimeError):
    """What the failing member raises."""


@contextlib.contextmanager
def failing(member, on_call: int, before_raise=None) -> Iterator[dict[str, int]]:
    """Make the member's forward pass raise `Boom` on its `on_call`-th call (1-based)."""
    model = forward_module(member)
    original = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            if before_raise is not None:
                before_raise()
            raise Boom("device-side assert triggered")
        return original(*args, **kwargs)

    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield calls
    finally:
        del model.forward


@pytest.fixture
def batches(monkeypatch):
    """Every MemberBatch made during the test, and those freed."""
    made, freed = [], []
    init, free = sync.MemberBatch.__init__, sync.MemberBatch.free

    def recording_init(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    def recording_free(self):
        freed.append(self)
        free(self)

    monkeypatch.setattr(sync.MemberBatch, "__init__", recording_init)
    monkeypatch.setattr(sync.MemberBatch, "free", recording_free)
    return made, freed


@pytest.fixture(scope="module")
def expected(tiny_ensemble):
    return tiny_ensemble.generate(PROMPTS, max_new_tokens=N)


def _ids(results):
    return [r.token_ids for r in results]


def _check_recovered(ens, expected, batches):
    made, freed = batches
    assert ens.queue_state() == IDLE
    assert made and {id(b) for b in made} <= {id(b) for b in freed}  # every cache freed
    assert _ids(ens.generate(PROMPTS, max_new_tokens=N)) == _ids(expected)


@pytest.mark.parametrize(
    ("which", "on_call"),
    [(1, 3), (0, 1), (0, 4)],
    ids=["helper-mid-generation", "main-at-prefill", "main-mid-generation"],
)
def test_a_failing_member_is_named_and_the_next_request_is_served(
    tiny_ensemble, expected, batches, which, on_call
):
    member = tiny_ensemble.members[which]
    with failing(member, on_call), pytest.raises(MemberError) as info:
        tiny_ensemble.generate(PROMPTS, max_new_tokens=N)
    error = info.value
    assert isinstance(error, DeepenError) and isinstance(error, RuntimeError)
    assert error.member == member.name
    assert str(error).startswith(
        f"Member {member.name!r} failed in its forward pass (Boom: device-side assert "
        "triggered); the request was abandoned and the ensemble stays usable."
    )
    assert isinstance(error.__cause__, Boom)
    _check_recovered(tiny_ensemble, expected, batches)


def test_what_was_streamed_before_the_failure_is_correct(tiny_ensemble, expected, batches):
    clean = list(tiny_ensemble.stream(PROMPTS, max_new_tokens=N))
    got = []
    with failing(tiny_ensemble.members[1], on_call=4), pytest.raises(MemberError):
        for event in tiny_ensemble.stream(PROMPTS, max_new_tokens=N):
            got.append(event)
    assert got == clean[: len(got)]
    assert len(got) < len(clean)
    _check_recovered(tiny_ensemble, expected, batches)


def test_batches_finished_before_the_failure_are_delivered_intact(tiny_ensemble, batches):
    prompts = [*PROMPTS, "Once upon a time"]
    clean = tiny_ensemble.generate(prompts, max_new_tokens=N, batch_size=2)
    helper = tiny_ensemble.members[1]
    # count the helper's forward passes of the first batch (rows 0 and 1)
    with failing(helper, on_call=10**9) as calls:
        finals = 0
        for event in tiny_ensemble.stream(prompts, max_new_tokens=N, batch_size=2):
            finals += event.finish_reason is not None
            if finals == 2:
                first_batch_calls = calls["n"]
                break
    # fail in the second batch's first step after its prefill
    events = []
    with failing(helper, on_call=first_batch_calls + 2), pytest.raises(MemberError):
        for event in tiny_ensemble.stream(prompts, max_new_tokens=N, batch_size=2):
            events.append(event)
    finished = {e.index: e for e in events if e.finish_reason is not None}
    assert sorted(finished) == [0, 1]
    for row in (0, 1):
        text = "".join(e.delta for e in events if e.index == row)
        assert (text, finished[row].token_ids) == (clean[row].text, clean[row].token_ids)
    after = tiny_ensemble.generate(prompts, max_new_tokens=N, batch_size=2)
    assert _ids(after) == _ids(clean)
    made, freed = batches
    assert {id(b) for b in made} <= {id(b) for b in freed}


def test_async_requests_get_the_error_and_the_next_one_is_served(tiny_ensemble, expected):
    async def main():
        with failing(tiny_ensemble.members[1], on_call=2), pytest.raises(MemberError) as info:
            await tiny_ensemble.agenerate(PROMPTS, max_new_tokens=N)
        return info.value, await tiny_ensemble.agenerate(PROMPTS, max_new_tokens=N)

    error, after = asyncio.run(main())
    assert error.member == "tiny-gemma"
    assert _ids(after) == _ids(expected)


def test_a_request_waiting_behind_a_failing_one_gets_its_own_text(tiny_ensemble, expected):
    results: dict[str, object] = {}
    queued = threading.Event()

    def second():
        queued.set()  # the failing request holds the ensemble: this one waits for it
        results["second"] = tiny_ensemble.generate(PROMPTS, max_new_tokens=N)

    thread = threading.Thread(target=second)

    def start_the_second_request():
        thread.start()
        queued.wait()

    with failing(tiny_ensemble.members[0], on_call=3, before_raise=start_the_second_request):
        with pytest.raises(MemberError, match="Member 'tiny-llama' failed"):
            tiny_ensemble.generate(PROMPTS, max_new_tokens=N)
        thread.join()
    assert _ids(results["second"]) == _ids(expected)


def test_members_on_distinct_devices_fail_the_same_way(tiny_pair, batches):
    ens = Ensemble(
        [
            MemberSpec(source=tiny_pair[0], name="a", device="cpu"),
            MemberSpec(source=tiny_pair[1], name="b", device="cpu:0"),  # runs in a pool
        ],
        min_anchors=50,
    )
    clean = ens.generate(PROMPTS[:2], max_new_tokens=N)
    with failing(ens.members[1], on_call=2), pytest.raises(MemberError, match="Member 'b'"):
        ens.generate(PROMPTS[:2], max_new_tokens=N)
    assert _ids(ens.generate(PROMPTS[:2], max_new_tokens=N)) == _ids(clean)
    made, freed = batches
    assert {id(b) for b in made} <= {id(b) for b in freed}


def test_integrations_pass_the_member_error_through(tiny_ensemble, expected):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from deepen_integrations.langchain import DeepEnLLM as LangChainLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    langchain = LangChainLLM(ensemble=tiny_ensemble, max_tokens=N)
    llama_index = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=N)
    with failing(tiny_ensemble.members[1], on_call=2), pytest.raises(MemberError, match="gemma"):
        langchain.invoke(PROMPTS[0])
    assert langchain.invoke(PROMPTS[0]) == expected[0].text

    async def main():
        with failing(tiny_ensemble.members[1], on_call=2), pytest.raises(MemberError):
            await llama_index.acomplete(PROMPTS[0])
        with failing(tiny_ensemble.members[0], on_call=1), pytest.raises(MemberError):
            await langchain.ainvoke(PROMPTS[0])
        return (await llama_index.acomplete(PROMPTS[0])).text

    assert asyncio.run(main()) == expected[0].text


def test_auto_rows_keep_their_scoring_prefill_only_while_they_fit(tiny_pair, batches):
    """main="auto" rows adopt the prefill that chose their leader when they join at once;
    rows left waiting (one row at a time here) free it and are prefilled when they join.
    Every batch made is freed, and each row equals the same prompt alone."""
    from deepen_engine import SchedulerConfig

    ens = Ensemble(
        [MemberSpec(source=tiny_pair[0], name="a"), MemberSpec(source=tiny_pair[1], name="b")],
        min_anchors=50,
        scheduler=SchedulerConfig(max_batch_size=1),
    )
    together = ens.generate(PROMPTS, max_new_tokens=N, speculate=0)
    alone = [ens.generate(p, max_new_tokens=N, speculate=0) for p in PROMPTS]
    assert _ids(together) == _ids(alone)
    ens.close()
    made, freed = batches
    assert len(made) > 2 * len(PROMPTS)  # the rows' own batches, kept and adopted
    assert {id(b) for b in made} <= {id(b) for b in freed}


def test_a_waiting_auto_request_that_times_out_frees_its_prefill(tiny_pair, batches):
    """A main="auto" request scored while another leader's batch runs holds its scoring
    prefill while it waits; when its timeout passes there, it fails with
    `RequestTimeoutError` and that prefill is freed (every batch made is freed)."""
    from deepen_engine import RequestTimeoutError, SchedulerConfig

    ens = Ensemble(
        [MemberSpec(source=tiny_pair[0], name="a"), MemberSpec(source=tiny_pair[1], name="b")],
        min_anchors=50,
        scheduler=SchedulerConfig(max_batch_size=2),
    )
    long_prompt = "The capital of France is Paris. The capital of Peru is"  # led by "b"
    other_leader = "def add(a, b):\n    return a + b"  # led by "a"
    long_run = {"max_new_tokens": 200, "min_new_tokens": 200, "speculate": 0}
    assert ens.generate(other_leader, max_new_tokens=1).usage.leader != (
        ens.generate(long_prompt, max_new_tokens=1).usage.leader
    )
    stream = ens.stream(long_prompt, **long_run)
    next(stream)
    with pytest.raises(RequestTimeoutError, match="timeout"):
        ens.generate(other_leader, max_new_tokens=N, timeout=0.3)
    assert list(stream)  # the long row finished
    ens.close()
    made, freed = batches
    assert {id(b) for b in made} <= {id(b) for b in freed}
