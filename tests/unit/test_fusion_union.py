"""The union methods (GaC `union`, UniTE `unite`) and the per-step gate, on the tiny members
with their real (trained) vocabularies: each formula against a plain, slow reference
written here; identity settings; batched rows equal rows alone."""

from __future__ import annotations

import math

import pytest
import torch

from deepen_engine.fusion import UnionFuser, UniteFuser

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):", "Zürich"]
END = b""


def _next_logits(ens, prompts):
    """Per member (B, V_i) next-token logits of each prompt."""
    out = []
    for m in ens.members:
        rows = []
        for p in prompts:
            ids = m.tokenizer(p, return_tensors="pt").input_ids
            with torch.no_grad():
                rows.append(m.model(ids).logits[0, -1].float())
        out.append(torch.stack(rows))
    return out


# Plain references -----------------------------------------------------------------------


def _key(member, token):
    """A token's text, END for end tokens, None for other special tokens."""
    if token in member.eos_ids:
        return END
    return member.vocab.texts[token]


_WRITERS: dict[int, tuple[object, dict]] = {}
"""Per member (by id, the member kept so the id stays its own): `_writer`'s answers so far;
a pure function of the member's vocabulary, asked for every token of every row and test."""


def _writer(member, key):
    """The member's token that writes `key`: same text, else its longest token starting it."""
    known = _WRITERS.setdefault(id(member), (member, {}))[1]
    if key not in known:
        known[key] = _find_writer(member, key)
    return known[key]


def _find_writer(member, key):
    if key is None:
        return None
    if key == END:
        return min(member.eos_ids)
    by_text = member.vocab.text_to_id()
    if key in by_text:
        return by_text[key]
    starts = [t for t in by_text if key.startswith(t)]
    return by_text[max(starts, key=len)] if starts else None


def _union_reference(ens, logits_row, weights, main):
    """GaC: P(t) = sum_i w_i sum_{v -> t} p_i(v), each p_i renormalised over its tokens
    that the main member can write."""
    main_member = ens.members[main]
    total = torch.zeros(len(main_member.vocab), dtype=torch.float64)
    for i, member in enumerate(ens.members):
        probs = torch.softmax(logits_row[i].double(), -1)
        targets = {v: _writer(main_member, _key(member, v)) for v in range(len(member.vocab))}
        entered = [v for v, t in targets.items() if t is not None]
        z = sum(float(probs[v]) for v in entered)
        for v in entered:
            total[targets[v]] += weights[i] * float(probs[v]) / z
    return total


def _unite_reference(ens, logits_row, weights, main, k):
    """UniTE as its docstring states it, with dicts and loops."""
    members = ens.members
    logp = [torch.log_softmax(x.double(), -1) for x in logits_row]
    union = {}  # key -> None, in member order then rank
    tops = []
    for i, member in enumerate(members):
        order = sorted(
            (v for v in range(len(member.vocab)) if _key(member, v) is not None),
            key=lambda v: -float(logp[i][v]),
        )[:k]
        tops.append(order)
        for v in order:
            union.setdefault(_key(member, v), None)
    keys = list(union)
    fused = [0.0] * len(keys)
    main_tokens = []
    for i, member in enumerate(members):
        own = {}
        for v in tops[i]:
            own.setdefault(_key(member, v), v)
        tokens = [own.get(s, _writer(member, s)) for s in keys]
        whole = [t is not None and _key(member, t) == s for t, s in zip(tokens, keys)]
        claimed = {t for t, w in zip(tokens, whole) if w}
        scored = []
        for t, w in zip(tokens, whole):
            if w:
                scored.append(True)
            elif t is not None and t not in claimed:
                claimed.add(t)
                scored.append(True)
            else:
                scored.append(False)
        if i == main:
            main_tokens = tokens
        z = sum(math.exp(float(logp[i][t])) for t, s in zip(tokens, scored) if s)
        for n, (t, s) in enumerate(zip(tokens, scored)):
            if s:
                fused[n] += weights[i] * math.exp(float(logp[i][t])) / z
    total = torch.zeros(len(members[main].vocab), dtype=torch.float64)
    for t, p in zip(main_tokens, fused):
        if t is not None:
            total[t] += p
    return total


def _check_against(fused_row, expected, main_logits_row):
    """log P where P > 0; every other token far below every candidate."""
    inside = expected > 0
    torch.testing.assert_close(
        fused_row[inside].double(), expected[inside].log(), atol=1e-4, rtol=0
    )
    if bool((~inside).any()):
        assert float(fused_row[~inside].max()) < float(fused_row[inside].min()) - 1000
    assert int(fused_row.argmax()) == int(expected.argmax())


# Formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("main", [0, 1])
@pytest.mark.parametrize("weights", [None, [0.3, 0.7]])
def test_union_matches_plain_reference(tiny_ensemble, main, weights):
    view = tiny_ensemble.with_fusion(method="union", main=main, weights=weights)
    assert isinstance(view.fuser, UnionFuser)
    logits = _next_logits(view, PROMPTS)
    fused = view.fuser.fuse(logits)
    w = view.fusion.normalised_weights(2)
    for b in range(len(PROMPTS)):
        expected = _union_reference(view, [x[b] for x in logits], w, main)
        _check_against(fused[b], expected, logits[main][b])


@pytest.mark.parametrize("main", [0, 1])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_unite_matches_plain_reference(tiny_ensemble, main, k):
    view = tiny_ensemble.with_fusion(method="unite", main=main, unite_top_k=k)
    assert isinstance(view.fuser, UniteFuser)
    logits = _next_logits(view, PROMPTS)
    fused = view.fuser.fuse(logits)
    for b in range(len(PROMPTS)):
        expected = _unite_reference(view, [x[b] for x in logits], [0.5, 0.5], main, k)
        _check_against(fused[b], expected, logits[main][b])


def test_unite_scores_a_missing_word_by_its_first_piece(tiny_ensemble):
    """A candidate only one member has whole is scored by the other's first piece of it."""
    view = tiny_ensemble.with_fusion(method="unite", main=0)
    llama, gemma = view.members
    texts0 = set(llama.vocab.text_to_id())
    word = next(
        t
        for t, g in gemma.vocab.text_to_id().items()
        if t not in texts0 and len(t) > 2 and _writer(llama, t) is not None
    )
    piece = _writer(llama, word)
    assert llama.vocab.texts[piece] != word and word.startswith(llama.vocab.texts[piece])
    helper = torch.full((1, len(gemma.vocab)), -20.0)
    helper[0, gemma.vocab.text_to_id()[word]] = 20.0  # the helper is sure of the word
    main = torch.zeros(1, len(llama.vocab))
    main[0, piece] = -5.0  # the main member doubts the piece
    fused = view.fuser.fuse([main, helper])
    assert int(fused.argmax()) == piece  # the main member writes the word's first piece


# Identity, batching, gate ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["union", "unite"])
def test_all_weight_on_main_is_the_main_member_alone(tiny_ensemble, method):
    view = tiny_ensemble.with_fusion(method=method, weights=[1.0, 0.0])
    assert view.fuser.is_identity
    logits = _next_logits(view, PROMPTS)
    assert torch.equal(view.fuser.fuse(logits), logits[0])
    alone = tiny_ensemble.with_fusion(eta=0).generate(PROMPTS, max_new_tokens=6)
    got = view.generate(PROMPTS, max_new_tokens=6)
    assert [r.text for r in got] == [r.text for r in alone]


@pytest.mark.parametrize("method", ["deepen", "union", "unite"])
def test_batched_rows_equal_rows_fused_alone(tiny_ensemble, method):
    view = tiny_ensemble.with_fusion(method=method, main=1)
    logits = _next_logits(view, PROMPTS)
    batched = view.fuser.fuse(logits)
    for b in range(len(PROMPTS)):
        alone = view.fuser.fuse([x[b : b + 1] for x in logits])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["union", "unite"])
def test_generation_batched_streamed_and_sampled_like_alone(tiny_ensemble, method):
    """Through the whole loop (KV sync, batching, streaming, sampling with a seed)."""
    view = tiny_ensemble.with_fusion(method=method)
    batch = view.generate(PROMPTS, max_new_tokens=8)
    for prompt, result in zip(PROMPTS, batch):
        assert view.generate(prompt, max_new_tokens=8).text == result.text
        streamed = "".join(e.delta for e in view.stream(prompt, max_new_tokens=8))
        assert streamed == result.text
    assert (
        batch[0].text
        != tiny_ensemble.with_fusion(eta=0).generate(PROMPTS[0], max_new_tokens=8).text
    )
    sampled = [
        view.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=3).text for _ in "ab"
    ]
    assert sampled[0] == sampled[1]
    chat = view.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert chat.finish_reason in {"length", "eos"}


@pytest.mark.parametrize("method", ["deepen", "union", "unite"])
def test_agree_gate_skips_rows_whose_members_agree(tiny_ensemble, method):
    view = tiny_ensemble.with_fusion(method=method, gate="agree")
    ungated = tiny_ensemble.with_fusion(method=method)
    llama, gemma = view.members
    anchor = 5  # an anchor text both members have
    a_main = int(view.anchors.token_ids[0][anchor])
    a_helper = int(view.anchors.token_ids[1][anchor])
    logits = _next_logits(view, PROMPTS[:2])
    logits[0][0, a_main] = 50.0  # row 0: both members' top token is the same anchor
    logits[1][0, a_helper] = 50.0
    logits[1][1] = logits[1][1].roll(7)  # row 1: they disagree (helper scrambled)
    assert int(logits[0][1].argmax()) != a_main or int(logits[1][1].argmax()) != a_helper
    fused = view.fuser.fuse(logits)
    assert torch.equal(fused[0], logits[0][0].float())  # skipped: the main member alone
    torch.testing.assert_close(fused[1], ungated.fuser.fuse([x[1:2] for x in logits])[0])
    assert (view.fuser.stats.rows, view.fuser.stats.gated) == (2, 1)


def test_rows_led_by_auto_count_in_the_views_stats(tiny_ensemble):
    # main="auto" fuses each row with a fuser of its leader; they count into the view's stats
    view = tiny_ensemble.with_fusion(method="union", main="auto")
    result = view.generate(PROMPTS[:2], max_new_tokens=3, speculate=0)  # a row-step a token
    assert view.fuser.stats.rows == sum(r.usage.completion_tokens for r in result) > 0


def test_confident_gate_follows_the_main_member_top_probability(tiny_ensemble):
    view = tiny_ensemble.with_fusion(method="union", gate="confident", gate_threshold=0.6)
    logits = _next_logits(view, PROMPTS[:2])
    logits[0][0, 9] = 100.0  # row 0: the main member is sure (top probability ~1)
    logits[0][1] = logits[0][1] * 0.0  # row 1: uniform, far from 0.6
    fused = view.fuser.fuse(logits)
    assert torch.equal(fused[0], logits[0][0])
    assert not torch.equal(fused[1], logits[0][1])
    assert view.fuser.stats.gated == 1


@pytest.mark.parametrize(
    ("field", "value"), [("method", "vote"), ("gate", "maybe"), ("gate_threshold", 0.0)]
)
def test_bad_method_settings_raise_naming_the_field(tiny_ensemble, field, value):
    from deepen_engine.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"FusionConfig\.{field}"):
        tiny_ensemble.with_fusion(**{field: value})


def _confidence_weights(logits_row, fixed):
    """Each member's fixed weight times its top probability, renormalised (plainly)."""
    tops = [float(torch.softmax(x.double(), -1).max()) for x in logits_row]
    scaled = [w * t for w, t in zip(fixed, tops)]
    return [x / sum(scaled) for x in scaled]


@pytest.mark.parametrize("method", ["union", "unite"])
def test_confidence_weighting_matches_plain_reference(tiny_ensemble, method):
    view = tiny_ensemble.with_fusion(method=method, weighting="confidence", weights=[0.6, 0.4])
    logits = _next_logits(view, PROMPTS)
    logits[1][0] = logits[1][0] * 8  # row 0: a sure helper
    fused = view.fuser.fuse(logits)
    for b in range(len(PROMPTS)):
        row = [x[b] for x in logits]
        w = _confidence_weights(row, [0.6, 0.4])
        if method == "union":
            expected = _union_reference(view, row, w, 0)
        else:
            expected = _unite_reference(view, row, w, 0, 10)
        _check_against(fused[b], expected, logits[0][b])
    fixed = tiny_ensemble.with_fusion(method=method, weights=[0.6, 0.4]).fuser.fuse(logits)
    assert not torch.allclose(fused[0], fixed[0])


def test_confidence_weighting_batched_equals_alone_for_deepen(tiny_ensemble):
    view = tiny_ensemble.with_fusion(weighting="confidence")
    logits = _next_logits(view, PROMPTS)
    batched = view.fuser.fuse(logits)
    for b in range(len(PROMPTS)):
        alone = view.fuser.fuse([x[b : b + 1] for x in logits])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=0)
