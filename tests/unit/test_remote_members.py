"""Members behind the step protocol (remote/batch.py, remote/actor.py), with
an in-process stand-in for Ray: each member's `MemberActor` runs here and every request
and reply is pickled on the way, as Ray would. Outputs must equal in-process members token
for token (greedy, batched, sampled, streamed, chat, rows joining a running batch, rows
with different fusion settings), the top-K reply must give what the full logits give, and
failures must raise `MemberError` naming the member, with the next request served.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading

import pytest

from deepen_engine import Ensemble, MemberError, MemberSpec
from deepen_engine.members import load_local_member as load_member
from deepen_engine.remote.actor import MemberActor
from deepen_engine.remote.backend import RemoteModel
from deepen_engine.remote.batch import LinkStats
from deepen_engine.remote.protocol import StepReply, StepRequest
from tests.conftest import forward_module

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
N = 8


class LocalLink:
    """A `MemberLink` to a `MemberActor` in this process; requests and replies are pickled
    (what Ray does), and every reply is kept for the test to look at."""

    def __init__(self, actor: MemberActor, name: str) -> None:
        self.actor = actor
        self.name = name
        self.stats = LinkStats()
        self.replies: list[StepReply] = []
        self.freed: list[int] = []
        self.fail_next: BaseException | None = None
        self.num_parameters = actor.member.num_parameters

    def step(self, request: StepRequest) -> StepReply:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        request = pickle.loads(pickle.dumps(request))
        reply = pickle.loads(pickle.dumps(self.actor.step(request)))
        self.replies.append(reply)
        return reply

    def free(self, batch: int) -> None:
        self.freed.append(batch)
        self.actor.free(batch)

    def close(self) -> None:
        pass


def remote_twin(member):
    """The coordinator's view of `member` running behind a LocalLink."""
    link = LocalLink(MemberActor.holding(member), member.name)
    embeddings = member.model.get_input_embeddings().weight.detach().clone()
    return dataclasses.replace(
        member, model=RemoteModel(member.model.config, embeddings), remote=link
    )


def _specs(tiny_pair):
    return [
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
    ]


def remote_ensemble(tiny_pair, **fusion) -> Ensemble:
    """The tiny pair as remote members (the names and settings of `local`)."""
    specs = _specs(tiny_pair)
    twins = [remote_twin(load_member(s)) for s in specs]
    with pytest.MonkeyPatch.context() as patch:  # only this ensemble gets the twins
        patch.setattr("deepen_engine.ensemble.load_members", lambda _: twins)
        return Ensemble(specs, min_anchors=50, **fusion)


@pytest.fixture(scope="module")
def local(tiny_pair) -> Ensemble:
    """The reference: the same tiny members in this process."""
    ens = Ensemble(_specs(tiny_pair), min_anchors=50)
    yield ens
    ens.close()


@pytest.fixture
def remote(tiny_pair, local):
    ens = remote_ensemble(tiny_pair)
    assert all(m.remote is not None for m in ens.members)
    assert all(m.remote is None for m in local.members)
    yield ens
    ens.close()


def _same(a, b) -> None:
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]


@pytest.mark.parametrize("main", [0, 1])
def test_greedy_batch_equals_in_process(remote, local, main):
    mine = remote.with_fusion(main=main).generate(PROMPTS, max_new_tokens=N)
    theirs = local.with_fusion(main=main).generate(PROMPTS, max_new_tokens=N)
    _same(mine, theirs)
    assert all(len(r.token_ids) == N for r in mine)
    # the usage's per-member fed positions come back from the actors
    assert [r.usage.fed_positions for r in mine] == [r.usage.fed_positions for r in theirs]


def test_sampled_streamed_and_chat_equal_in_process(remote, local):
    kw = dict(max_new_tokens=N, temperature=0.9, top_p=0.95, seed=3)
    _same(remote.generate(PROMPTS, **kw), local.generate(PROMPTS, **kw))
    deltas = [e.delta for e in remote.stream(PROMPTS[0], max_new_tokens=N) if e.delta]
    assert "".join(deltas) == local.generate(PROMPTS[0], max_new_tokens=N).text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (
        remote.generate(chat, max_new_tokens=N).text == local.generate(chat, max_new_tokens=N).text
    )


def test_deepen_reads_every_members_full_logits(remote):
    # the fast path reads every anchor token's probability: nothing may be cut
    main, helper = (m.remote for m in remote.members)
    remote.generate(PROMPTS, max_new_tokens=4)
    for member, batch in zip(remote.members, (main, helper)):
        vocab = len(member.vocab.texts)
        assert all(r.logits is not None and r.logits.shape[1] == vocab for r in batch.replies)
        last = batch.replies[-1]
        assert last.payload_bytes() >= 4 * vocab * last.logits.shape[0]  # float32 each
        assert batch.stats.calls == len(batch.replies) and batch.stats.received_bytes > 0


def test_rows_joining_and_mixed_fusion_settings_equal_in_process(remote, local):
    """Concurrent requests share the batch (rows join a running batch and leave it), with
    different fusion top-k (helpers send the widest top-k the rows need)."""
    views = [
        (remote, local),
        (remote.with_fusion(top_k=8), local.with_fusion(top_k=8)),
    ]
    jobs = [(views[i % 2], PROMPTS[i % 3], 4 + 3 * i) for i in range(6)]
    got: dict[int, object] = {}

    def run(i):
        (mine, _), prompt, n = jobs[i]
        got[i] = mine.generate(prompt, max_new_tokens=n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ((_, theirs), prompt, n) in enumerate(jobs):
        _same([got[i]], [theirs.generate(prompt, max_new_tokens=n)])


def test_closed_stream_frees_the_actor_batches(remote):
    stream = remote.stream(PROMPTS, max_new_tokens=50)
    next(stream)
    stream.close()
    remote.generate(PROMPTS[0], max_new_tokens=2)  # the worker is past the step
    for m in remote.members:
        held = m.remote.actor.held_rows()
        assert all(rows == 0 for rows in held.values()), held


def test_failing_forward_raises_member_error_and_next_request_is_served(remote, local):
    helper = remote.members[1]
    original = helper.model  # the actor's member holds the real model
    actor_model = forward_module(helper.remote.actor.member)
    calls = {"n": 0}
    forward = actor_model.forward

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device-side assert triggered")
        return forward(*args, **kwargs)

    actor_model.forward = boom
    try:
        with pytest.raises(MemberError, match="tiny-gemma.*device-side assert") as info:
            remote.generate(PROMPTS, max_new_tokens=N)
        assert info.value.member == "tiny-gemma"
    finally:
        del actor_model.forward
    assert helper.model is original
    _same(
        remote.generate(PROMPTS, max_new_tokens=N),
        local.generate(PROMPTS, max_new_tokens=N),
    )


def test_lost_actor_raises_member_error_and_next_request_is_served(remote, local):
    link = remote.members[0].remote
    link.fail_next = MemberError("tiny-llama", "Member 'tiny-llama': its Ray actor died")
    with pytest.raises(MemberError, match="tiny-llama") as info:
        remote.generate(PROMPTS[0], max_new_tokens=N)
    assert info.value.member == "tiny-llama"
    _same(
        [remote.generate(PROMPTS[0], max_new_tokens=N)],
        [local.generate(PROMPTS[0], max_new_tokens=N)],
    )


def test_a_restarted_actor_fails_the_request_it_lost_and_serves_the_next(remote, local):
    """Ray restarts a dead actor by rerunning its constructor: the new one holds no batch,
    so the running request fails (never runs on an empty cache) and the next is served."""
    link = remote.members[1].remote
    stream = remote.stream(PROMPTS[0], max_new_tokens=N)
    next(e for e in stream if e.delta)
    link.actor = MemberActor.holding(link.actor.member)  # what a restart leaves
    with pytest.raises(MemberError, match="'tiny-gemma' failed in its Ray actor.*restarted"):
        list(stream)
    _same(
        [remote.generate(PROMPTS[0], max_new_tokens=N)],
        [local.generate(PROMPTS[0], max_new_tokens=N)],
    )


def test_resumed_rows_and_logprobs_equal_in_process(tiny_pair):
    """Rows that resume after ids already generated (prefilled with them: the edits before
    the first forward) and log-probabilities from the fused distribution.

    Fresh ensembles given the same calls: relative rows computed together with other rows
    can differ from rows computed alone in the last bit, so fused logits (not tokens)
    depend on what a fuser's row cache saw before, in process as well."""
    from deepen_engine import GenerationConfig
    from deepen_engine.decoding.decode import decode

    mine, theirs = remote_ensemble(tiny_pair), Ensemble(_specs(tiny_pair), min_anchors=50)
    first = mine.generate(PROMPTS[1], max_new_tokens=4).token_ids
    assert first == theirs.generate(PROMPTS[1], max_new_tokens=4).token_ids
    config = GenerationConfig(max_new_tokens=10, speculate=0)  # events token by token in both

    def run(ens):
        events = decode(ens.members, ens.fuser, [[(PROMPTS[1], True)] * 2], config, resume=[first])
        return [(e.delta, e.token_ids) for e in events]

    assert run(mine) == run(theirs)
    kw = dict(max_new_tokens=N, logprobs=3, speculate=0)  # verified logits differ in last bits
    got, expected = mine.generate(PROMPTS, **kw), theirs.generate(PROMPTS, **kw)
    # main="auto": in process the rows adopt the caches of the prefill that chose their
    # leader (decoding/leaders.py), read in other batches than an actor's second prefill:
    # the same tokens, log-probabilities equal up to their last bits
    assert _logprob_rows(got) == _logprob_rows(expected)
    for r, e in zip(got, expected):
        assert [t.logprob for t in r.logprobs] == pytest.approx([t.logprob for t in e.logprobs])
    assert all(r.logprobs for r in got)
    mine.close()
    theirs.close()


def _logprob_rows(results):
    """Each result's chosen tokens and their top alternatives, without the values."""
    return [[(t.id, t.token, [a.id for a in t.top]) for t in r.logprobs] for r in results]


def test_a_top_k_reply_gives_what_the_full_logits_give():
    """The protocol's top-K reply (for a method whose `logits_needed` asks for K): topk and
    logsumexp equal the full tensor's, rows select and concatenate as tensors do, and
    reading more than was sent fails loudly."""
    import torch

    from deepen_engine.remote.protocol import TopLogits

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    reply = pickle.loads(pickle.dumps(StepReply.of_logits(logits, 8, [4, 4, 4], 0.1)))
    assert reply.logits is None and reply.payload_bytes() < 4 * 500
    top = reply.member_logits(500)
    assert isinstance(top, TopLogits) and top.shape == logits.shape
    for got, want in zip(top.topk(5), logits.topk(5)):
        assert torch.equal(got, want)
    assert torch.allclose(top.logsumexp(-1), logits.logsumexp(-1))
    rows = torch.tensor([2, 0])
    assert torch.equal(top[rows].topk(3)[1], logits[rows].topk(3)[1])
    narrow = StepReply.of_logits(logits[:1], 4, [4], 0.0).member_logits(500)
    both = TopLogits.cat([top, narrow])
    assert both.shape == (4, 500)
    with pytest.raises(RuntimeError, match="sent only the top 4"):
        both.topk(5)
    with pytest.raises(AttributeError):
        top.softmax(-1)  # a method reading the whole distribution must ask for it


class ReleasingRay:
    """What RayLink.close uses of `ray`: the killed actor's CPU shows free only after a few
    polls (as Ray releases it a moment after the kill), or never."""

    def __init__(self, polls_until_free: int | None) -> None:
        self.free, self.polls, self.killed = 0.0, 0, False
        self.polls_until_free = polls_until_free

    def available_resources(self) -> dict[str, float]:
        if self.killed:
            self.polls += 1
            if self.polls_until_free is not None and self.polls >= self.polls_until_free:
                self.free = 1.0
        return {"CPU": self.free}

    def kill(self, actor, no_restart) -> None:
        assert no_restart is True
        self.killed = True


def test_closing_a_ray_link_waits_until_its_resources_show_free(monkeypatch):
    from deepen_engine.remote import backend

    spec = MemberSpec(source="gemma-3-270m", placement="ray", num_cpus=1)
    ray = ReleasingRay(polls_until_free=3)
    backend.RayLink(ray, object(), spec, "gemma-3-270m").close()
    assert (ray.polls, ray.free) == (3, 1.0)  # returned at the first poll that saw it free
    # a cluster that never shows them free (another driver took them): bounded wait
    monkeypatch.setattr(backend, "_RELEASE_WAIT", 0.2)
    ray = ReleasingRay(polls_until_free=None)
    backend.RayLink(ray, object(), spec, "gemma-3-270m").close()
    assert ray.killed and ray.polls >= 2 and ray.free == 0.0
