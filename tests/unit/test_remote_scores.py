"""Prompt scores of a member behind the step protocol (remote/batch.py, remote/actor.py),
through the in-process stand-in for Ray of test_remote_members.py: the member prefills and
scores in its actor, the spans going with the batch's `Open` and the sums coming back with
the reply, in the prefill's one round trip. `weighting="prompt"` and `main="auto"` must
give exactly what the same members give in process: scores, leaders, text and ids.
"""

from __future__ import annotations

import pickle

import pytest

from deepen_engine import Ensemble
from deepen_engine.decoding.member_batch import MemberBatch
from deepen_engine.members import load_local_member as load_member
from deepen_engine.remote.batch import RemoteMemberBatch
from deepen_engine.remote.protocol import Open, StepReply, StepRequest, TakeRows
from tests.conftest import PLAIN
from tests.unit.test_remote_members import _specs, remote_twin

PROMPTS = [
    "The capital of France is Paris. The capital of Peru is",
    "Q: What is 12 + 7?\nA: 19\nQ: What is 3 + 4?\nA:",
    "def add(a, b):\n    return a + b",
]
N = 6


def mixed_ensemble(tiny_pair, remote: int) -> Ensemble:
    """The tiny pair (the names and settings of `tiny_ensemble`), member `remote` behind a
    LocalLink, the other in this process.
    """
    specs = _specs(tiny_pair)
    members = [load_member(s) for s in specs]
    members[remote] = remote_twin(members[remote])
    with pytest.MonkeyPatch.context() as patch:  # only this ensemble gets the twin
        patch.setattr("deepen_engine.ensemble.load_members", lambda _: members)
        return Ensemble(specs, min_anchors=50, **PLAIN)


@pytest.fixture(scope="module", params=[0, 1], ids=["remote-main", "remote-helper"])
def mixed(request, tiny_pair):
    """(the ensemble, its remote member)."""
    ens = mixed_ensemble(tiny_pair, request.param)
    assert [m.remote is not None for m in ens.members] == [i == request.param for i in (0, 1)]
    yield ens, ens.members[request.param]
    ens.close()


def _same(mine, theirs) -> None:
    assert [r.token_ids for r in mine] == [r.token_ids for r in theirs]
    assert [r.text for r in mine] == [r.text for r in theirs]
    assert [r.usage.leader for r in mine] == [r.usage.leader for r in theirs]
    # exactly: the actor's sums cross as they are
    assert [r.usage.prompt_bits_per_byte for r in mine] == [
        r.usage.prompt_bits_per_byte for r in theirs
    ]


@pytest.mark.parametrize("span", ["whole", "second-half"])
def test_prompt_weighting_equals_in_process(mixed, tiny_ensemble, span):
    ens, remote = mixed
    settings = dict(weighting="prompt", prompt_score=span, weight_temperature=0.05)
    link = remote.remote
    before = len(link.replies)
    mine = ens.with_fusion(**settings).generate(PROMPTS, max_new_tokens=N)
    theirs = tiny_ensemble.with_fusion(**settings).generate(PROMPTS, max_new_tokens=N)
    _same(mine, theirs)
    assert all(r.usage.prompt_bits_per_byte[remote.name] is not None for r in mine)
    # the prefill's one round trip brings the sums back; the steps after it, none; and
    # the request costs the calls it costs without scores
    replies = link.replies[before:]
    assert replies[0].scores is not None and len(replies[0].scores) == len(PROMPTS)
    assert all(reply.scores is None for reply in replies[1:])
    before = len(link.replies)
    plain = ens.generate(PROMPTS, max_new_tokens=N)
    assert [len(r.token_ids) for r in plain] == [len(r.token_ids) for r in mine]
    assert len(link.replies) - before == len(replies)


def test_auto_leader_equals_in_process(mixed, tiny_ensemble):
    ens, remote = mixed
    for settings in ({"main": "auto"}, {"main": "auto", "prompt_score": "second-half"}):
        mine = ens.with_fusion(**settings).generate(PROMPTS, max_new_tokens=N)
        theirs = tiny_ensemble.with_fusion(**settings).generate(PROMPTS, max_new_tokens=N)
        _same(mine, theirs)
        assert all(r.usage.prompt_bits_per_byte for r in mine)
        # the scoring prefill's batch was freed in the actor (and so was the request's)
        assert all(rows == 0 for rows in remote.remote.actor.held_rows().values())
    both = {"main": "auto", "weighting": "prompt", "weight_temperature": 0.05}
    _same(
        ens.with_fusion(**both).generate(PROMPTS, max_new_tokens=N),
        tiny_ensemble.with_fusion(**both).generate(PROMPTS, max_new_tokens=N),
    )


def test_auto_rows_keep_the_actors_scoring_prefill(mixed, tiny_ensemble, monkeypatch):
    """A `main="auto"` request of several rows: the actor copies each row's cache out of
    the batch that scored the prompts (one `TakeRows` call), so it opens and reads every
    prompt once; before, the rows' own batch opened and read them all again."""
    ens, remote = mixed
    link = remote.remote
    ops, take_replies = [], []
    step = link.step

    def recording(request):
        ops.extend(request.ops)
        reply = step(request)
        if any(isinstance(op, TakeRows) for op in request.ops):
            take_replies.append(reply)
        return reply

    monkeypatch.setattr(link, "step", recording)
    mine = ens.with_fusion(main="auto").generate(PROMPTS, max_new_tokens=N)
    _same(mine, tiny_ensemble.with_fusion(main="auto").generate(PROMPTS, max_new_tokens=N))
    opened = [ids for op in ops if isinstance(op, Open) for ids in op.prompt_ids]
    prompts = [remote.tokenizer(p).input_ids for p in PROMPTS]
    assert sorted(opened) == sorted(prompts)  # each prompt once
    takes = [op for op in ops if isinstance(op, TakeRows)]
    assert [op.rows for op in takes] == [[0, 1, 2]]
    # the call runs the first copy: its reply brings one row's logits, not the batch's
    assert [len(reply.fed_positions) for reply in take_replies] == [1]
    assert all(rows == 0 for rows in link.actor.held_rows().values())


def _scored(batch: MemberBatch, spans: list[str]) -> MemberBatch:
    """`batch` scoring its rows over `spans`, as the loop sets it, then prefilled."""
    batch.score_prompts = True
    for row, span in zip(batch.rows, spans):
        row.score.span = span
    batch.forward()
    return batch


def test_a_remote_batch_scores_in_one_call_and_keeps_its_scores_when_merged(tiny_pair):
    member = load_member(_specs(tiny_pair)[1])
    twin = remote_twin(member)
    ids = [member.tokenizer(p).input_ids for p in PROMPTS]
    spans = ["whole", "second-half", "whole"]
    expected = [  # the same two batches in process (a row's last bits depend on its batch)
        r.score.bits_per_byte
        for part in (slice(0, 2), slice(2, 3))
        for r in _scored(MemberBatch(member, ids[part]), spans[part]).rows
    ]
    assert all(bpb is not None for bpb in expected)
    link = twin.remote
    first = _scored(RemoteMemberBatch(twin, ids[:2]), spans[:2])
    assert link.stats.calls == 1  # the Open went with the prefill
    second = _scored(RemoteMemberBatch(twin, ids[2:]), spans[2:])
    assert [r.score.bits_per_byte for r in first.rows + second.rows] == expected
    running = RemoteMemberBatch(twin, [])  # the loop's batch, which does not score
    running.merge(first)
    running.merge(second)
    for b in range(len(ids)):
        running.append(b, 5)
    running.forward()  # the merges go with this call; its reply has no scores
    assert link.replies[-1].scores is None
    assert [r.score.bits_per_byte for r in running.rows] == expected
    assert link.actor.held_rows()[running.batch_id] == len(ids)
    running.free()


def test_the_spans_and_sums_are_counted_in_the_payload():
    plain = StepRequest([Open(1, [[1, 2], [3]])], 1, None)
    scoring = StepRequest([Open(1, [[1, 2], [3]], ["whole", "second-half"])], 1, None)
    assert scoring.payload_bytes() - plain.payload_bytes() == len("whole") + len("second-half")
    sums = StepReply(fed_positions=[0, 0], scores=[(1.5, 4, 2), (0.5, 3, 1)])
    assert sums.payload_bytes() - StepReply(fed_positions=[0, 0]).payload_bytes() == 48
    assert pickle.loads(pickle.dumps(sums)).scores == sums.scores
    take = StepRequest([TakeRows(1, [0, 1, 2], [7, 8, 9])], 1, None)
    assert take.payload_bytes() - StepRequest([], 1, None).payload_bytes() == 8 * 7
