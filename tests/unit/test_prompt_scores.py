"""Prompt scores (decoding/prompt_scores.py) and prompt-scored weights (fusion/weights.py)
on tiny members with different tokenizers."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from deepen_engine import ConfigError, FusionConfig
from deepen_engine.decoding.member_batch import MemberBatch
from deepen_engine.decoding.prompt_scores import SCORE_LOGITS_BUDGET, score_width
from deepen_engine.fusion.weights import lowest_score, prompt_weights

PROMPTS = [
    "The capital of France is Paris. The capital of Peru is",
    "Q: What is 12 + 7?\nA: 19\nQ: What is 3 + 4?\nA:",
    "def add(a, b):\n    return a + b",
]


def _direct_bpb(member, text: str) -> float:
    """Bits per byte of `text` in `member`, computed directly: one forward over the whole
    prompt, every token from the second on with text, NLL in bits over its bytes."""
    ids = member.tokenizer(text).input_ids
    with torch.no_grad():
        logits = member.model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    nll, size = 0.0, 0
    for t in range(1, len(ids)):
        data = member.vocab.texts[ids[t]]
        if data:
            nll -= float(logp[t - 1, ids[t]])
            size += len(data)
    return nll / math.log(2) / size


def _direct_second_half_bpb(member, text: str) -> float | None:
    """The same over the tokens that start at or after the middle byte of the text."""
    ids = member.tokenizer(text).input_ids
    with torch.no_grad():
        logits = member.model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    sizes = [len(member.vocab.texts[t] or b"") for t in ids]
    middle = sum(sizes) / 2
    nll, size = 0.0, 0
    for t in range(1, len(ids)):
        if sum(sizes[:t]) >= middle and sizes[t]:
            nll -= float(logp[t - 1, ids[t]])
            size += sizes[t]
    return nll / math.log(2) / size if size else None


def _scored_batch(member, texts: list[str], chunk: int, span: str = "whole") -> MemberBatch:
    batch = MemberBatch(member, [member.tokenizer(t).input_ids for t in texts])
    batch.chunk = chunk
    batch.score_prompts = True
    for row in batch.rows:
        row.score.span = span
    batch.forward()
    return batch


@pytest.mark.parametrize("m", [0, 1], ids=["llama-bpe", "gemma3-sp"])
def test_bits_per_byte_equals_a_direct_computation(tiny_ensemble, m):
    member = tiny_ensemble.members[m]
    batch = _scored_batch(member, PROMPTS, chunk=0)
    for row, prompt in zip(batch.rows, PROMPTS):
        assert row.score.bits_per_byte == pytest.approx(_direct_bpb(member, prompt), rel=1e-4)
    batch.free()


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("m", [0, 1], ids=["llama-bpe", "gemma3-sp"])
def test_second_half_score_equals_a_direct_computation(tiny_ensemble, m, chunk):
    """Scored in one pass or in chunks of 4, with logits kept only where a token of the
    second half is predicted, the score is the direct one; the next-token logits are those
    of an unscored prefill."""
    member = tiny_ensemble.members[m]
    batch = _scored_batch(member, PROMPTS, chunk=chunk, span="second-half")
    plain = MemberBatch(member, [member.tokenizer(t).input_ids for t in PROMPTS])
    plain.forward()
    for row, prompt in zip(batch.rows, PROMPTS):
        direct = _direct_second_half_bpb(member, prompt)
        assert direct is not None
        assert row.score.bits_per_byte == pytest.approx(direct, rel=1e-4)
        assert row.score.bytes < len(prompt.encode()) * 0.6
    assert torch.allclose(batch.require_logits(), plain.require_logits(), atol=1e-4)
    batch.free()
    plain.free()


def test_a_prompt_of_one_token_has_no_second_half_score(tiny_ensemble):
    member = tiny_ensemble.members[0]
    assert len(member.tokenizer("A").input_ids) == 1
    batch = _scored_batch(member, ["A"], chunk=0, span="second-half")
    assert batch.rows[0].score.bits_per_byte is None
    batch.free()


def test_the_second_half_score_leads_and_weights_the_rows(tiny_ensemble):
    """`prompt_score="second-half"` reports and uses the second half's scores."""
    view = tiny_ensemble.with_fusion(weighting="prompt", prompt_score="second-half")
    (result,) = view.generate([PROMPTS[1]], max_new_tokens=2)
    for member in tiny_ensemble.members:
        expected = _direct_second_half_bpb(member, PROMPTS[1])
        assert result.usage.prompt_bits_per_byte[member.name] == pytest.approx(expected, rel=1e-4)
    auto = view.with_fusion(main="auto")
    (led,) = auto.generate([PROMPTS[1]], max_new_tokens=2)
    scores = [_direct_second_half_bpb(m, PROMPTS[1]) for m in tiny_ensemble.members]
    assert led.usage.leader == tiny_ensemble.members[scores.index(min(scores))].name
    with pytest.raises(ConfigError, match="prompt_score"):
        tiny_ensemble.with_fusion(prompt_score="last")


@pytest.mark.parametrize("m", [0, 1], ids=["llama-bpe", "gemma3-sp"])
def test_chunked_prefill_scores_as_one_pass(tiny_ensemble, m):
    member = tiny_ensemble.members[m]
    whole = _scored_batch(member, PROMPTS, chunk=0)
    chunked = _scored_batch(member, PROMPTS, chunk=3)
    for a, b in zip(whole.rows, chunked.rows):
        assert b.score.bits_per_byte == pytest.approx(a.score.bits_per_byte, rel=1e-4)
        assert (b.score.bytes, b.score.tokens) == (a.score.bytes, a.score.tokens)
    # and the next-token logits after the prompt are the same
    assert torch.allclose(whole.require_logits(), chunked.require_logits(), atol=1e-4)
    whole.free()
    chunked.free()


def test_the_bytes_scored_are_the_prompt_after_its_first_token(tiny_ensemble):
    for member in tiny_ensemble.members:
        batch = _scored_batch(member, PROMPTS, chunk=0)
        for row, prompt in zip(batch.rows, PROMPTS):
            ids = member.tokenizer(prompt).input_ids
            covered = b"".join(member.vocab.texts[t] or b"" for t in ids[1:])
            assert row.score.bytes == len(covered)
            assert covered and prompt.encode().endswith(covered)
        batch.free()


def test_score_width_bounds_the_logits_kept():
    assert score_width(1, 1000, 512) == 512
    assert score_width(4, 262_144, 512) == SCORE_LOGITS_BUDGET // (4 * 262_144)
    assert score_width(10_000, 262_144, 512) == 1


def test_prompt_weights_are_a_softmax_of_minus_bpb_over_temperature():
    w = prompt_weights([0.4, 0.7], [0.5, 0.5], 0.1)
    assert w == pytest.approx([1 / (1 + math.exp(-3.0)), math.exp(-3.0) / (1 + math.exp(-3.0))])
    # the fixed weights are the prior
    w = prompt_weights([0.4, 0.4], [0.75, 0.25], 0.1)
    assert w == pytest.approx([0.75, 0.25])
    # no score for some member: the fixed weights
    assert prompt_weights([None, 0.3], [0.5, 0.5], 0.1) == [0.5, 0.5]
    assert lowest_score([0.9, 0.3, 0.5], [0, 1, 2]) == 1
    assert lowest_score([0.9, 0.3, 0.5], [0, 2]) == 2
    assert lowest_score([0.9, None], [0, 1]) is None


def test_prompt_weighting_reports_each_members_score(tiny_ensemble):
    ens = tiny_ensemble.with_fusion(weighting="prompt")
    result = ens.generate(PROMPTS[0], max_new_tokens=4)
    scores = result.usage.prompt_bits_per_byte
    assert list(scores) == ["tiny-llama", "tiny-gemma"]
    for member in ens.members:
        assert scores[member.name] == pytest.approx(_direct_bpb(member, PROMPTS[0]), rel=1e-4)
    # fixed weighting does not pay for the scores
    assert tiny_ensemble.generate(PROMPTS[0], max_new_tokens=4).usage.prompt_bits_per_byte == {}


@pytest.mark.parametrize("method", ["deepen", "union", "unite"])
def test_prompt_weights_per_row_in_one_batch_equal_each_row_alone(tiny_ensemble, method):
    ens = tiny_ensemble.with_fusion(weighting="prompt", weight_temperature=0.05, method=method)
    together = ens.generate(PROMPTS, max_new_tokens=10)
    for prompt, row in zip(PROMPTS, together):
        alone = ens.generate(prompt, max_new_tokens=10)
        assert alone.token_ids == row.token_ids
        assert alone.usage.prompt_bits_per_byte == pytest.approx(row.usage.prompt_bits_per_byte)


def test_prompt_weighting_changes_the_fusion(tiny_ensemble):
    """Prompt weights differ per row from uniform ones, so some output differs."""
    uniform = [r.token_ids for r in tiny_ensemble.generate(PROMPTS, max_new_tokens=12)]
    ens = tiny_ensemble.with_fusion(weighting="prompt", weight_temperature=0.01)
    scored = [r.token_ids for r in ens.generate(PROMPTS, max_new_tokens=12)]
    assert scored != uniform


def test_a_sharp_temperature_follows_the_better_reader(tiny_ensemble):
    """At a tiny temperature the row's weight is all on its lowest-bpb member: with that
    member as main, the fusion is that member alone."""
    for prompt in PROMPTS:
        ens = tiny_ensemble.with_fusion(weighting="prompt", weight_temperature=1e-4)
        bpb = ens.generate(prompt, max_new_tokens=1).usage.prompt_bits_per_byte
        best = lowest_score([bpb[m.name] for m in ens.members], [0, 1])
        assert best is not None
        led = ens.with_fusion(main=best, method="union")
        alone = ens.with_fusion(main=best, eta=0)
        assert led.generate(prompt, max_new_tokens=8).token_ids == (
            alone.generate(prompt, max_new_tokens=8).token_ids
        )


def test_bad_weighting_settings_name_the_value():
    with pytest.raises(ConfigError, match="weight_temperature"):
        FusionConfig(weighting="prompt", weight_temperature=0)
    with pytest.raises(ConfigError, match="weighting"):
        FusionConfig(weighting="perplexity")


# ---------------------------------------------------------------- main="auto"


def test_auto_leads_each_row_with_the_member_the_scores_say(tiny_ensemble):
    scored = tiny_ensemble.with_fusion(weighting="prompt")
    auto = tiny_ensemble.with_fusion(main="auto")
    results = auto.generate(PROMPTS, max_new_tokens=8)
    names = [m.name for m in tiny_ensemble.members]
    leaders = set()
    for prompt, result in zip(PROMPTS, results):
        bpb = scored.generate(prompt, max_new_tokens=1).usage.prompt_bits_per_byte
        best = lowest_score([bpb[n] for n in names], [0, 1])
        assert best is not None
        assert result.usage.leader == names[best]
        leaders.add(best)
        # the row is exactly what that leader gives with the same settings otherwise
        expected = tiny_ensemble.with_fusion(main=best).generate(prompt, max_new_tokens=8)
        assert (result.token_ids, result.text) == (expected.token_ids, expected.text)
    again = auto.generate(PROMPTS, max_new_tokens=8)
    assert [r.token_ids for r in again] == [r.token_ids for r in results]
    # the scores that chose the leader are reported
    for prompt, result in zip(PROMPTS, results):
        bpb = scored.generate(prompt, max_new_tokens=1).usage.prompt_bits_per_byte
        assert result.usage.prompt_bits_per_byte == pytest.approx(bpb)


def test_auto_rows_with_different_leaders_in_one_request(tiny_ensemble):
    """Rows of one request led by different members (found by the scores) each give what
    they give alone."""
    auto = tiny_ensemble.with_fusion(main="auto", method="union")
    texts = PROMPTS + ["Once upon a time there was", "1, 2, 3, 4, 5,", "Bonjour, je suis"]
    results = auto.generate(texts, max_new_tokens=6)
    if len({r.usage.leader for r in results}) < 2:
        pytest.skip("these random members agree on the leader of every prompt")
    for text, result in zip(texts, results):
        assert auto.generate(text, max_new_tokens=6).token_ids == result.token_ids


def test_auto_chat_rows_lead_with_a_chat_member(tiny_ensemble):
    chat = [r for r, m in enumerate(tiny_ensemble.members) if m.tokenizer.chat_template]
    auto = tiny_ensemble.with_fusion(main="auto")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = auto.generate(messages, max_new_tokens=4)
    assert result.usage.leader in {tiny_ensemble.members[i].name for i in chat}


def test_auto_chat_row_with_one_chat_member_is_not_scored_twice(tiny_ensemble, monkeypatch):
    """With one chat member the chat row's leader is known: no scoring prefill runs, the
    row's own prefill scores it for its weights, and it equals that leader fixed."""
    from deepen_engine.decoding import leaders

    chat = [r for r, m in enumerate(tiny_ensemble.members) if m.tokenizer.chat_template]
    assert len(chat) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("scored before joining")

    monkeypatch.setattr(leaders, "score_rows", refuse)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = {"weighting": "prompt", "weight_temperature": 0.05}
    auto = tiny_ensemble.with_fusion(main="auto", **settings).generate(messages, max_new_tokens=6)
    fixed = tiny_ensemble.with_fusion(main=chat[0], **settings).generate(messages, max_new_tokens=6)
    assert (auto.token_ids, auto.usage.leader) == (fixed.token_ids, fixed.usage.leader)
    assert auto.usage.prompt_bits_per_byte == fixed.usage.prompt_bits_per_byte
    assert len(auto.usage.prompt_bits_per_byte) == 2


@pytest.mark.parametrize("weighting", ["fixed", "prompt"])
def test_auto_with_tools_leads_with_the_chat_rule(tiny_ensemble, weighting):
    """The calls are written in the leader's chat format, fixed before the prompt is read:
    auto with tools is `default_chat_main()`, with the same weights otherwise."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    settings = {"weighting": weighting, "weight_temperature": 0.05}
    auto = tiny_ensemble.with_fusion(main="auto", **settings)
    lead = tiny_ensemble.default_chat_main()
    fixed = tiny_ensemble.with_fusion(main=lead, **settings)
    for choice in ("auto", "required"):
        kwargs = {"tools": tools, "tool_choice": choice, "max_new_tokens": 24}
        got, expected = auto.generate(messages, **kwargs), fixed.generate(messages, **kwargs)
        assert (got.text, got.tool_calls) == (expected.text, expected.tool_calls)
        assert got.usage.leader == tiny_ensemble.members[lead].name


def test_a_bad_main_names_the_value():
    with pytest.raises(ConfigError, match="main"):
        FusionConfig(main="best")
    with pytest.raises(ConfigError, match="main"):
        FusionConfig(main=-1)


def _positions_read(ensemble):
    """{member name: positions its forwards read so far} and the hooks counting them."""
    read = {m.name: 0 for m in ensemble.members}
    hooks = []
    for m in ensemble.members:
        body = m.output_layer.body if m.output_layer is not None else m.model

        def count(module, args, kwargs, name=m.name):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            read[name] += int(ids.numel())

        hooks.append(body.register_forward_pre_hook(count, with_kwargs=True))
    return read, hooks


def test_auto_rows_read_their_prompt_once(tiny_ensemble):
    """The prefill that scores an auto row's prompt to choose its leader is the row's own:
    its batch adopts those caches, so every member reads the prompt once, as with the
    leader fixed, and the row is what that leader gives."""
    auto_view = tiny_ensemble.with_fusion(main="auto", weighting="prompt")
    for prompt in PROMPTS[:2]:
        read, hooks = _positions_read(tiny_ensemble)
        try:
            auto = auto_view.generate(prompt, max_new_tokens=5, speculate=0)
            by_auto = dict(read)
            lead = [m.name for m in tiny_ensemble.members].index(auto.usage.leader)
            for name in read:
                read[name] = 0
            fixed = tiny_ensemble.with_fusion(main=lead, weighting="prompt").generate(
                prompt, max_new_tokens=5, speculate=0
            )
        finally:
            for hook in hooks:
                hook.remove()
        assert (auto.token_ids, auto.text) == (fixed.token_ids, fixed.text)
        assert by_auto == read  # before: one more read of the prompt by every member
        assert auto.usage.prompt_bits_per_byte == fixed.usage.prompt_bits_per_byte


@pytest.mark.parametrize(
    ("second_prompt", "max_batch_size"),
    [
        # the batch is full: the request is scored when room opens, right before it joins
        (PROMPTS[1], 1),
        # another leader's batch runs: the request is scored at once (the batch has room)
        # and keeps that prefill while it waits for the batch to drain
        (PROMPTS[2], 2),
    ],
    ids=["waiting-for-room", "waiting-for-another-leader"],
)
def test_auto_requests_waiting_read_their_prompt_once(tiny_pair, second_prompt, max_batch_size):
    """A main="auto" request that waits behind a long row joins with the prefill that
    chose its leader: its prompt is read once, as when it runs alone (scoring it while it
    waited and reading it again at its join read it twice; before, a request waiting for
    another leader freed that prefill). Every cache is freed once both are done."""
    from deepen_engine import Ensemble, MemberSpec, SchedulerConfig

    ens = Ensemble(
        [MemberSpec(source=tiny_pair[0], name="a"), MemberSpec(source=tiny_pair[1], name="b")],
        min_anchors=50,
        scheduler=SchedulerConfig(max_batch_size=max_batch_size),
    )
    long_run = {"max_new_tokens": 160, "min_new_tokens": 160, "speculate": 0}
    short_run = {"max_new_tokens": 5, "speculate": 0}
    read, hooks = _positions_read(ens)
    try:
        first = ens.generate(PROMPTS[0], **long_run)
        alone_first = dict(read)
        for name in read:
            read[name] = 0
        second = ens.generate(second_prompt, **short_run)
        alone_second = dict(read)
        for name in read:
            read[name] = 0
        # the premise: one leader for both, or two (PROMPTS[0] is led by "b", [2] by "a")
        assert (first.usage.leader == second.usage.leader) == (max_batch_size == 1)
        results: dict[str, object] = {}
        stream = ens.stream(PROMPTS[0], **long_run)
        next(stream)  # the long row runs
        waiter = threading.Thread(
            target=lambda: results.update(second=ens.generate(second_prompt, **short_run))
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while ens.queue_state()["waiting_requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        waited = (
            ens.queue_state()["waiting_requests"] == 1 and ens.queue_state()["running_rows"] == 1
        )
        rest = list(stream)
        waiter.join()
        idle = ens.queue_state()["kv_cache_bytes"]
    finally:
        for hook in hooks:
            hook.remove()
        ens.close()
    assert waited, "the second request never waited for the long one"
    assert rest and results["second"].token_ids == second.token_ids
    assert first.token_ids  # the long row decoded alone and beside a waiting request alike
    assert read == {n: alone_first[n] + alone_second[n] for n in read}
    assert idle == 0  # every cache freed, the waiting row's prefill too
