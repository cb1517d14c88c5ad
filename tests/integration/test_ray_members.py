"""Integration tier: the default members in Ray actors on a local Ray cluster.

Ray members must give exactly the in-process outputs (greedy, batched, streamed, sampled
with a seed, chat, concurrent requests, prompt scores and the leaders they choose); a
killed or stuck actor fails the request with `MemberError` naming the member and the next
request is served; a cluster that lacks the resources asked for is a `ConfigError` before
any model loads.

The two command-line tests read `deepen generate --ray` and `deepen bench --ray` run in the
tier's one process (conftest.CLI_ITEMS); every test, those items included (they join it
through `RAY_ADDRESS`), uses the tier's one local Ray (conftest.ray_cluster: 3 CPUs, 2 for
the placed pair, 1 for the adapter's member).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from deepen_engine import ConfigError, Ensemble, MemberError, MemberSpec
from deepen_engine.members import DEFAULT_MEMBERS

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "The capital of France is",
    "Q: What is the capital of Japan?\nA:",
    "Translate to French: good morning\nFrench:",
]
CHAT = [{"role": "user", "content": "What is the capital of Italy?"}]


@pytest.fixture(scope="module")
def local(default_ensemble) -> Ensemble:
    return default_ensemble  # the default members in this process, loaded once per run


def test_generate_with_ray_equals_in_process(local, one_process):
    done = one_process["cli:generate-ray"]
    assert done.rc == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["text"] == local.generate(PROMPTS[0], max_new_tokens=12).text


def test_bench_ray_small(one_process):
    done = one_process["cli:bench-ray"]
    assert done.rc == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["same_tokens_as_in_process"] is True
    assert figures["members"] == list(DEFAULT_MEMBERS)
    main, helper = (figures["protocol"][n] for n in DEFAULT_MEMBERS)
    # batch 1, per step: each member sends all its float32 logits (DeePEn's fast path reads
    # every anchor's probability): Gemma-3 262,144, SmolLM2 49,152; 16 bytes of fed
    # positions and timing; and in the prefill's reply the row's prompt score sums for the
    # default weighting="prompt" (nll, bytes, tokens: 24 bytes, over the 4 steps)
    assert main["received_bytes_per_row_step"] == 4 * 262144 + 16 + 24 / 4
    assert helper["received_bytes_per_row_step"] == 4 * 49152 + 16 + 24 / 4
    assert set(figures["median"]) >= {"ray_ms", "in_process_ms", "ray_to_slower_member"}


@pytest.fixture(scope="module")
def placed(ray_cluster) -> Ensemble:
    ens = Ensemble([MemberSpec(source=s, placement="ray") for s in DEFAULT_MEMBERS])
    yield ens
    ens.close()


def _same(mine, theirs) -> None:
    assert [r.token_ids for r in mine] == [r.token_ids for r in theirs]
    assert [r.text for r in mine] == [r.text for r in theirs]


def test_actors_run_this_checkout_one_thread_each(placed):
    infos = [m.remote.info for m in placed.members]
    assert [i.code for i in infos] == [str(ROOT / "deepen_engine")] * 2
    assert [i.torch_threads for i in infos] == [1, 1]
    assert len({i.pid for i in infos}) == 2 and os.getpid() not in {i.pid for i in infos}


@pytest.mark.parametrize("main", [0, 1])
def test_greedy_batches_equal_in_process(placed, local, main):
    mine = placed.with_fusion(main=main).generate(PROMPTS, max_new_tokens=24)
    theirs = local.with_fusion(main=main).generate(PROMPTS, max_new_tokens=24)
    _same(mine, theirs)
    assert all(r.token_ids for r in mine)


def test_streamed_sampled_and_chat_equal_in_process(placed, local):
    deltas = [e.delta for e in placed.stream(PROMPTS[1], max_new_tokens=24) if e.delta]
    assert "".join(deltas) == local.generate(PROMPTS[1], max_new_tokens=24).text
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    _same(placed.generate(PROMPTS, **kw), local.generate(PROMPTS, **kw))
    chat = placed.with_fusion(main=placed.default_chat_main())
    _same(
        [chat.generate(CHAT, max_new_tokens=16)],
        [local.with_fusion(main=local.default_chat_main()).generate(CHAT, max_new_tokens=16)],
    )


def test_prompt_scores_and_auto_leader_equal_in_process(placed, local):
    """`main="auto"`: each actor scores the prompts in a prefill of its own before the
    rows join; with a fixed leader, in the rows' prefill; the scores weigh the members
    (`weighting="prompt"`). The actors run one torch thread and this process more, so the
    scores may differ in their last bits."""
    for kw in (
        dict(weighting="prompt", main="auto"),
        dict(weighting="prompt", prompt_score="second-half"),  # scored in the row's prefill
    ):
        mine = placed.with_fusion(**kw).generate(PROMPTS, max_new_tokens=16)
        theirs = local.with_fusion(**kw).generate(PROMPTS, max_new_tokens=16)
        _same(mine, theirs)
        assert [r.usage.leader for r in mine] == [r.usage.leader for r in theirs]
        for got, expected in zip(mine, theirs):
            assert set(got.usage.prompt_bits_per_byte) == set(DEFAULT_MEMBERS)
            assert got.usage.prompt_bits_per_byte == pytest.approx(
                expected.usage.prompt_bits_per_byte, rel=1e-5
            )


def test_an_auto_row_keeps_the_actors_scoring_prefill(placed, local):
    """A one-row `main="auto"` request: the prefill in which each actor scores the prompt
    is the row's own (the actor keeps that batch, the decoder merges it), so each actor is
    called as often as with the leader fixed; before, one call more, a second prefill."""
    names = [m.name for m in placed.members]

    def calls() -> list[int]:
        return [m.remote.stats.calls for m in placed.members]

    run = dict(max_new_tokens=6, speculate=0)
    start = calls()
    auto = placed.with_fusion(main="auto").generate(PROMPTS[1], **run)
    auto_calls = [c - s for c, s in zip(calls(), start)]
    start = calls()
    fixed = placed.with_fusion(main=names.index(auto.usage.leader)).generate(PROMPTS[1], **run)
    fixed_calls = [c - s for c, s in zip(calls(), start)]
    assert auto_calls == fixed_calls
    assert (auto.token_ids, auto.text) == (fixed.token_ids, fixed.text)
    _same([auto], [local.with_fusion(main="auto").generate(PROMPTS[1], **run)])
    assert auto.usage.prompt_bits_per_byte == pytest.approx(
        fixed.usage.prompt_bits_per_byte, rel=1e-6
    )
    for member in placed.members:  # the request's batches are gone from the actors
        assert sum(ray.get(member.remote.actor.held_rows.remote()).values()) == 0


def test_auto_rows_are_copied_out_of_the_actors_scoring_batch(placed, local, monkeypatch):
    """A `main="auto"` request of several rows: each actor copies the rows' caches out of
    the batch that scored their prompts (one `TakeRows` call), so it opens and reads every
    prompt once (before, the rows' own batch read them all again); outputs equal in
    process, and the actors hold no rows after."""
    from deepen_engine.remote.protocol import Open, TakeRows

    ops: dict[str, list] = {m.name: [] for m in placed.members}
    for member in placed.members:
        link, step = member.remote, member.remote.step

        def recording(request, step=step, name=member.name):
            ops[name].extend(request.ops)
            return step(request)

        monkeypatch.setattr(link, "step", recording)
    run = dict(max_new_tokens=8, speculate=0)
    mine = placed.with_fusion(main="auto").generate(PROMPTS, **run)
    _same(mine, local.with_fusion(main="auto").generate(PROMPTS, **run))
    for member in placed.members:
        sent = ops[member.name]
        opened = [ids for op in sent if isinstance(op, Open) for ids in op.prompt_ids]
        prompts = [member.tokenizer(p).input_ids for p in PROMPTS]
        assert sorted(opened) == sorted(prompts)  # each prompt once
        assert [op.rows for op in sent if isinstance(op, TakeRows)] == [[0, 1, 2]]
        assert sum(ray.get(member.remote.actor.held_rows.remote()).values()) == 0


def test_concurrent_requests_equal_in_process_and_free_their_rows(placed, local):
    jobs = [(PROMPTS[i % 3], 6 + 5 * i) for i in range(4)]
    got = {}

    def run(i):
        got[i] = placed.generate(jobs[i][0], max_new_tokens=jobs[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, n) in enumerate(jobs):
        _same([got[i]], [local.generate(prompt, max_new_tokens=n)])
    stream = placed.stream(PROMPTS, max_new_tokens=64)
    next(stream)
    stream.close()  # the rows leave at the next step
    placed.generate(PROMPTS[0], max_new_tokens=2)
    for m in placed.members:
        held = ray.get(m.remote.actor.held_rows.remote())
        assert all(rows == 0 for rows in held.values()), (m.name, held)


def test_killed_actor_fails_the_request_and_the_next_is_served(placed, local):
    helper = placed.members[1]
    stream = placed.stream(PROMPTS[0], max_new_tokens=64)
    next(e for e in stream if e.delta)  # the request is running
    ray.kill(helper.remote.actor, no_restart=False)
    # the step in flight fails (the actor died), or the next reaches the restarted actor,
    # which no longer holds the request's cache: either way the request fails
    with pytest.raises(MemberError, match="'smollm2-135m-instruct'.*Ray actor.*restart") as info:
        for _ in stream:
            pass
    assert info.value.member == "smollm2-135m-instruct"
    _same(placed.generate(PROMPTS, max_new_tokens=12), local.generate(PROMPTS, max_new_tokens=12))


def test_stuck_actor_times_out_and_the_next_request_is_served(placed, local):
    link = placed.members[0].remote
    link.step_timeout = 0.001  # no forward pass answers that fast: as if the actor hung
    try:
        with pytest.raises(MemberError, match="'gemma-3-270m' did not answer within") as info:
            placed.generate(PROMPTS[0], max_new_tokens=8)
        assert info.value.member == "gemma-3-270m"
    finally:
        link.step_timeout = 120.0
    _same(
        [placed.generate(PROMPTS[2], max_new_tokens=8)],
        [local.generate(PROMPTS[2], max_new_tokens=8)],
    )


def test_adapter_with_a_member_in_ray_equals_in_process(placed, local):
    """`DeepEnLLM(models=[...])` with mixed placements: Gemma-3 here, SmolLM2 in an actor."""
    from deepen_integrations.langchain import DeepEnLLM

    helper = MemberSpec(source="smollm2-135m-instruct", placement="ray", num_cpus=0.5)
    llm = DeepEnLLM(models=["gemma-3-270m", helper], max_tokens=12)
    assert llm.invoke(PROMPTS[0]) == local.generate(PROMPTS[0], max_new_tokens=12).text


def test_missing_resources_are_a_config_error_before_loading(placed):
    with pytest.raises(ConfigError, match="asks Ray for CPU=64, but no node"):
        Ensemble([MemberSpec(source="gemma-3-270m", placement="ray", num_cpus=64)])
    # `placed` holds 2 of the cluster's 3 CPUs (and the adapter's member half of the third)
    with pytest.raises(
        ConfigError, match=r"ask for CPU=2 in all, but the cluster has CPU=(1|0.5) free"
    ):
        Ensemble([MemberSpec(source="gemma-3-270m", placement="ray", num_cpus=2)])
