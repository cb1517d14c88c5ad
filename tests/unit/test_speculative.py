"""Speculative fused decoding (decoding/speculative.py) on tiny members whose tokenizers
split words differently (byte-level BPE main or helper, SentencePiece the other): greedy
output identical to `speculate=0` in every setting, caches exact after roll-backs, sampled
output distributed as without speculation."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from deepen_engine import ConfigError, GenerationConfig
from deepen_engine.commands.cli import build_parser
from deepen_engine.commands.options import generation_options, generation_settings
from deepen_engine.config import METHODS
from deepen_engine.decoding.acceptance import accept_draft
from deepen_engine.decoding.cache_ops import common_prefix
from deepen_engine.decoding.cross_drafts import drafter_position, main_ids
from deepen_engine.decoding.drafts import settle_speculation
from deepen_engine.decoding.loop import BatchDecoder
from deepen_engine.decoding.rows import NewRow
from deepen_engine.decoding.sampling import Sampler, position_uniform
from deepen_engine.server.protocol import parse_completion

PROMPTS = [
    "The capital of France is",
    "Q: What is 12 + 7?\nA:",
    "def add(a, b):",
    "Once upon a time there was",
]


def _same(base, out):
    assert [r.text for r in out] == [r.text for r in base]
    assert [r.token_ids for r in out] == [r.token_ids for r in base]
    assert [r.finish_reason for r in out] == [r.finish_reason for r in base]


@pytest.fixture(scope="module")
def plain_greedy(tiny_ensemble):
    """PROMPTS' plain greedy results (24 new tokens, `speculate=0`) of the view with fusion
    `method` led by member `main`: decoded once per (method, main) for the module, as both
    the main-member and the helper-drafter equality tests compare against them."""
    done: dict[tuple[str, int], list] = {}

    def results(method: str, main: int) -> list:
        if (method, main) not in done:
            view = tiny_ensemble.view({"method": method, "main": main})
            done[method, main] = view.generate(PROMPTS, max_new_tokens=24, speculate=0)
        return done[method, main]

    return results


def _usage(results):
    drafted = sum(r.usage.drafted_tokens for r in results)
    return drafted, sum(r.usage.accepted_tokens for r in results)


@pytest.mark.parametrize("main", [0, 1], ids=["bpe-main", "sp-main"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_equals_plain_decoding(tiny_ensemble, plain_greedy, method, main):
    view = tiny_ensemble.view({"method": method, "main": main})
    base = plain_greedy(method, main)
    assert _usage(base) == (0, 0)
    accepted = 0
    for k in (2, 4, 8):
        out = view.generate(PROMPTS, max_new_tokens=24, speculate=k)
        _same(base, out)
        drafted, kept = _usage(out)
        assert drafted > kept  # some drafts were rejected: both paths ran
        accepted += kept
    assert accepted > 0


@pytest.mark.parametrize("gate", ["agree", "confident"])
def test_greedy_equality_with_the_gate(tiny_ensemble, gate):
    view = tiny_ensemble.view({"gate": gate, "gate_threshold": 0.05, "main": 1})
    base = view.generate(PROMPTS, max_new_tokens=20, speculate=0)
    _same(base, view.generate(PROMPTS, max_new_tokens=20, speculate=4))


def test_stop_strings_min_tokens_and_end_tokens(tiny_ensemble):
    view = tiny_ensemble.view({"main": 1})
    plain = view.generate(PROMPTS, max_new_tokens=30, speculate=0)
    # a stop string from the middle of each row's own text: it fires inside a draft
    stops = [r.text[len(r.text) // 2 : len(r.text) // 2 + 2] for r in plain if len(r.text) > 6]
    settings = {"max_new_tokens": 30, "stop": stops, "min_new_tokens": 5}
    base = view.generate(PROMPTS, **settings, speculate=0)
    assert "stop" in [r.finish_reason for r in base]
    for k in (2, 8):
        _same(base, view.generate(PROMPTS, speculate=k, **settings))


def test_streaming_and_logprobs_equal_plain_decoding(tiny_ensemble):
    view = tiny_ensemble.view({"main": 1})
    base = view.generate(PROMPTS[:2], max_new_tokens=20, logprobs=2, speculate=0)
    out = view.generate(PROMPTS[:2], max_new_tokens=20, logprobs=2, speculate=4)
    _same(base, out)
    for a, b in zip(base, out):
        assert a.logprobs is not None and b.logprobs is not None
        assert [(e.id, [t.id for t in e.top]) for e in a.logprobs] == [
            (e.id, [t.id for t in e.top]) for e in b.logprobs
        ]
        for x, y in zip(a.logprobs, b.logprobs):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
    deltas: dict[int, str] = {0: "", 1: ""}
    for event in view.stream(PROMPTS[:2], max_new_tokens=20, speculate=4):
        deltas[event.index] += event.delta
    assert [deltas[0], deltas[1]] == [r.text for r in base]


def test_constrained_rows_decode_without_drafts_and_equal_plain(tiny_ensemble):
    view = tiny_ensemble.view({"main": 1})
    settings = {"max_new_tokens": 24, "regex": r"[a-z ]{3,12}![0-9]{2}"}
    base = view.generate(PROMPTS[:2], **settings, speculate=0)
    out = view.generate(PROMPTS[:2], speculate=4, **settings)
    _same(base, out)
    assert _usage(out) == (0, 0)


def _drive(ensemble, joins, configs, check=None, max_rows=0, prompts=PROMPTS, precision="bfloat16"):
    """Drive a BatchDecoder by hand: rows join before the steps in `joins`; the token ids
    of every row by prompt index (into `prompts`). `check(decoder)` runs after every
    advance; `max_rows` and `precision` are `SchedulerConfig.speculate_max_rows` and
    `draft_precision`.
    """
    fuser = ensemble.fuser
    decoder = BatchDecoder(
        ensemble.members, fuser.main, speculate_max_rows=max_rows, draft_precision=precision
    )
    ids: dict[int, list[int]] = {}
    try:
        for step in range(80):
            if step in joins:
                new = [
                    NewRow(
                        prompts=[(prompts[p], True)] * 2, config=configs[p], fuser=fuser, index=p
                    )
                    for p in joins[step]
                ]
                decoder.join(decoder.prepare(new))
            if not decoder.rows and step > max(joins):
                break
            for _, event in decoder.step() if decoder.rows else []:
                if event.finish_reason is not None:
                    ids[event.index] = event.token_ids
            if decoder.rows:
                decoder.advance()
                if check is not None:
                    check(decoder)
    finally:
        decoder.close()
    return ids


def test_rows_of_different_k_joining_mid_flight_equal_each_alone(tiny_ensemble):
    configs = [
        GenerationConfig(max_new_tokens=14, speculate=8),
        GenerationConfig(max_new_tokens=9, speculate=0),
        GenerationConfig(max_new_tokens=16, speculate=2, stop=["e "]),
        GenerationConfig(max_new_tokens=12, speculate=4, regex=r"[a-z]{2,6}[.!]"),
    ]
    ids = _drive(tiny_ensemble, {0: [0, 1], 2: [2], 5: [3]}, configs)
    assert sorted(ids) == [0, 1, 2, 3]
    for p, got in ids.items():
        plain = configs[p].model_copy(update={"speculate": 0})
        assert got == tiny_ensemble.generate(PROMPTS[p], plain).token_ids


def test_more_rows_than_speculate_max_rows_take_standard_steps(tiny_ensemble):
    """Two rows with a limit of one: standard steps; the long row drafts once the short
    one has left, and stops drafting when a third row joins. Every row's ids equal it
    decoded alone without speculation."""
    seen = []

    def check(decoder):
        seen.append((len(decoder.rows), decoder.speculator.wanted()))

    configs = [
        GenerationConfig(max_new_tokens=30, min_new_tokens=30, speculate=4),
        GenerationConfig(max_new_tokens=4, speculate=4),
        GenerationConfig(max_new_tokens=6, speculate=2),
    ]
    ids = _drive(tiny_ensemble.view({"main": 1}), {0: [0, 1], 8: [2]}, configs, check, 1)
    assert sorted(ids) == [0, 1, 2]
    assert all(not wanted for rows, wanted in seen if rows > 1)
    alone = [i for i, (rows, wanted) in enumerate(seen) if rows == 1 and wanted]
    crowded = [i for i, (rows, _) in enumerate(seen) if rows > 1]
    assert alone and crowded[0] < alone[0] < crowded[-1]  # off, on, off again
    view = tiny_ensemble.view({"main": 1})
    for p, got in ids.items():
        plain = configs[p].model_copy(update={"speculate": 0})
        assert got == view.generate(PROMPTS[p], plain).token_ids


def test_the_default_limit_reaches_the_decoder(tiny_pair):
    from deepen_engine import Ensemble, MemberSpec, SchedulerConfig
    from tests.conftest import PLAIN

    assert SchedulerConfig().speculate_max_rows == 1
    bad = r"SchedulerConfig.speculate_max_rows: Input should be greater than or equal to 0, got -1"
    with pytest.raises(ConfigError, match=bad):
        SchedulerConfig(speculate_max_rows=-1)
    members = [MemberSpec(source=tiny_pair[0], name="l"), MemberSpec(source=tiny_pair[1], name="g")]
    ens = Ensemble(members, min_anchors=50, **PLAIN)
    try:
        base = ens.generate(PROMPTS, max_new_tokens=12, speculate=0)
        two = ens.generate(PROMPTS[:2], max_new_tokens=12, speculate=4)  # 2 rows > 1
        _same(base[:2], two)
        assert _usage(two) == (0, 0)
        one = ens.generate(PROMPTS[:1], max_new_tokens=12, speculate=4)
        _same(base[:1], one)
        assert _usage(one)[0] > 0
    finally:
        ens.close()
    parser = build_parser()
    assert parser.parse_args(["serve"]).speculate_max_rows == 1
    assert parser.parse_args(["serve", "--speculate-max-rows", "0"]).speculate_max_rows == 0
    args = parser.parse_args(["serve", "--max-batch-size", "3", "--max-queue", "5"])
    assert (args.max_batch_size, args.max_queue) == (3, 5)
    assert (parser.parse_args(["serve"]).max_batch_size, args.speculate_max_rows) == (32, 1)


def exact_logits(batch, b):
    """Row b's latest logits as the next step reads them: where a draft body fed its last
    position (`RowIds.drafted`), a copy of the row is fed again exactly, as
    `require_logits` does, and the decoder's own state is left as it is.
    """
    if not batch.rows[b].drafted:
        return batch.logits[b]
    one = batch.take_row(b)
    try:
        return one.require_logits()[0]
    finally:
        one.free()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("feed_helpers", [True, False], ids=["helpers-fed", "helpers-wait"])
def test_rolled_back_caches_equal_a_fresh_prefill(tiny_ensemble, feed_helpers, precision):
    """After every speculative step and advance, each member's logits for each fed row equal
    a fresh forward over that row's ids, and each helper's ids equal its tokenisation of
    prompt + text. Helpers' last ids wait for the next verification forward; with
    `feed_helpers` they are fed at once (the next step then reads position 0 off them).
    Drafting in bfloat16, the main member's last position is the draft body's after each
    advance: fed again exactly (`exact_logits`), it gives the fresh forward's logits."""
    checked = []
    drafted = []

    def check(decoder):
        if feed_helpers:
            decoder.speculator.catch_up()
        for batch in decoder.batches:
            member = batch.member
            for b, row in enumerate(batch.rows):
                if member is not decoder.main_member:
                    text = decoder.rows[b].text.text
                    tail = member.tokenizer(text, add_special_tokens=False).input_ids
                    assert row.ids == row.prompt_ids + tail
                if row.cached < len(row.ids):
                    continue  # waiting for the next step's verification forward
                drafted.append(row.drafted)
                with torch.inference_mode():
                    fresh = member.model(input_ids=torch.tensor([row.ids])).logits[0, -1]
                logits = exact_logits(batch, b)
                torch.testing.assert_close(logits, fresh.float(), atol=1e-4, rtol=1e-4)
                checked.append(member.name)

    configs = [GenerationConfig(max_new_tokens=20, speculate=k) for k in (8, 4, 2, 8)]
    view = tiny_ensemble.view({"main": 1})
    ids = _drive(view, {0: [0, 1, 2], 3: [3]}, configs, check, precision=precision)
    assert len(ids) == 4
    helper = tiny_ensemble.members[0].name
    assert (checked.count(helper) > 10) == feed_helpers
    # the draft body fed the main member's last position before most steps, or never
    assert (drafted.count(1) > 10) == (precision == "bfloat16")
    assert max(drafted) <= 1


def _sampled_ids(ensemble, config, seeds, text="The capital of France is"):
    """Token ids of one prompt's rows, one row per seed, decoded in one batch."""
    fuser = ensemble.fuser
    decoder = BatchDecoder(ensemble.members, fuser.main, draft_precision="bfloat16")
    prompt = [(text, True)] * 2
    rows = [
        NewRow(prompts=prompt, config=config, fuser=fuser, index=i, seed=s)
        for i, s in enumerate(seeds)
    ]
    out: dict[int, tuple[int, ...]] = {}
    drafted = accepted = 0
    try:
        decoder.join(decoder.prepare(rows))
        while decoder.rows:
            for _, event in decoder.step():
                if event.finish_reason is not None:
                    assert event.usage is not None and event.token_ids is not None
                    out[event.index] = tuple(event.token_ids)
                    drafted += event.usage.drafted_tokens
                    accepted += event.usage.accepted_tokens
            if decoder.rows:
                decoder.advance()
    finally:
        decoder.close()
    return [out[i] for i in range(len(seeds))], drafted, accepted


def _assert_plain_sampling(
    ensemble, first_seed: int, text: str = "The capital of France is", **speculation
) -> None:
    """Sampled rows with speculation (`speculate=2`; `speculation` in both runs) give the
    very tokens the same seeds give without it: 300 seeded rows of 6 tokens, unite fusion
    led by member 1 (drafts are often rejected), temperature 1 and top-k 3. The same
    seeds give varied outputs (so the rows do sample), and drafts were both kept and
    rejected."""
    view = ensemble.view({"method": "unite", "main": 1})
    seeds = range(first_seed, first_seed + 300)
    runs = []
    for k in (0, 2):
        cfg = GenerationConfig(
            max_new_tokens=6, temperature=1.0, top_k=3, speculate=k, **speculation
        )
        ids, drafted, accepted = _sampled_ids(view, cfg, seeds, text)
        if k:
            assert drafted > accepted > 0
        runs.append(ids)
    assert runs[1] == runs[0]
    assert len(set(runs[0])) >= 20


def test_sampled_output_equals_plain_sampling(tiny_ensemble):
    """Main-member drafts, drawn at the numbers plain sampling reads."""
    _assert_plain_sampling(tiny_ensemble, 10_000)


def test_speculate_is_validated_and_reaches_every_entry_point():
    with pytest.raises(ConfigError, match="speculate"):
        GenerationConfig(speculate=-1)
    with pytest.raises(ConfigError, match="speculate"):
        GenerationConfig(speculate=17)
    parser = argparse.ArgumentParser(parents=[generation_options()])
    assert generation_settings(parser.parse_args(["--speculate", "4"])).speculate == 4
    assert parse_completion({"prompt": "x", "speculate": 3}).generation["speculate"] == 3


def test_ray_members_are_refused_with_speculation():
    members = [SimpleNamespace(name="a", remote=None), SimpleNamespace(name="b", remote=object())]
    row = NewRow(prompts=[], config=GenerationConfig(speculate=2), fuser=None, index=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"speculate=2 \(row 1\) is not supported yet"):
        settle_speculation(members, [row], 2)  # type: ignore[arg-type]
    unset = NewRow(prompts=[], config=GenerationConfig(), fuser=None)  # type: ignore[arg-type]
    settle_speculation(members, [unset], 2)  # type: ignore[arg-type]
    assert unset.config.speculate == 0  # the default: off with members in Ray actors


def test_unset_speculate_is_the_default_with_members_in_process():
    from deepen_engine.decoding.drafts import DEFAULT_SPECULATE

    members = [SimpleNamespace(name="a", remote=None), SimpleNamespace(name="b", remote=None)]
    unset = NewRow(prompts=[], config=GenerationConfig(), fuser=None)  # type: ignore[arg-type]
    off = NewRow(prompts=[], config=GenerationConfig(speculate=0), fuser=None)  # type: ignore[arg-type]
    settle_speculation(members, [unset, off], 2)  # type: ignore[arg-type]
    assert (unset.config.speculate, off.config.speculate) == (DEFAULT_SPECULATE, 0) == (4, 0)


def test_bench_speculative_section(tiny_folders, capsys):
    from deepen_engine.commands.cli import main
    from tests.conftest import member_args

    flags = ["--speculative-only", "--new-tokens", "6", "--speculative-repeats", "2", "--json"]
    assert main(["bench", *member_args(tiny_folders), *flags, "--speculate-max-rows", "0"]) == 0
    figures = json.loads(capsys.readouterr().out)
    section = figures["speculative"]
    assert (section["speculate"], section["rounds"], section["new_tokens"]) == (4, 2, 6)
    assert section["speculate_max_rows"] == 0
    rows = section["rows"]
    assert [(r["batch_size"], r["kind"]) for r in rows] == [
        (1, "greedy"), (1, "sampled"), (8, "greedy"), (8, "sampled")
    ]  # fmt: skip
    for r in rows:
        assert r["speedup"] == pytest.approx(
            r["speculative_tokens_per_s"] / r["standard_tokens_per_s"], rel=0.02
        )
        assert 0 <= r["acceptance_rate"] <= 1 and r["mean_accepted_length"] >= 0
        assert isinstance(r["resyncs"], int) and r["resyncs"] >= 0
        assert r["ratio_to_slower_member"] > 0 and r["ratio_to_slower_member_engine"] > 0
        # after the first token: 5 of the 6 tokens of each row
        assert r["first_token_s"] > 0
        if r["decode_speedup"] is not None:
            assert r["decode_speedup"] == pytest.approx(
                r["speculative_decode_tokens_per_s"] / r["standard_decode_tokens_per_s"],
                rel=0.02,
            )
    assert [r["same_tokens"] for r in rows] == [True] * 4  # sampled too: same seeds
    assert any(r["decode_speedup"] is not None for r in rows)
    one = ["--speculative-only", "--new-tokens", "3", "--speculative-repeats", "1"]
    four = ["--speculative-batch-sizes", "4", "--json"]  # more rows than the default limit
    assert main(["bench", *member_args(tiny_folders), *one, *four]) == 0
    section = json.loads(capsys.readouterr().out)["speculative"]
    assert section["speculate_max_rows"] == 1
    assert [(r["acceptance_rate"], r["mean_accepted_length"]) for r in section["rows"]] == [
        (None, None), (None, None)
    ]  # fmt: skip
    assert section["rows"][0]["same_tokens"] is True
    assert main(["bench", *member_args(tiny_folders), *one, "--speculative-batch-sizes", "2"]) == 0
    table = capsys.readouterr().out
    assert "spec tok/s" in table and "(engine)" in table and "decode" in table
    assert main(["bench", *member_args(tiny_folders), *one, "--speculate-k", "0"]) == 2
    assert "--speculate-k must be from 1 to 16, got 0." in capsys.readouterr().err
    drafters = ["--speculative-drafters", "main", "1", "--speculative-batch-sizes", "2"]
    drafters += ["--speculate-max-rows", "2"]
    assert main(["bench", *member_args(tiny_folders), *one, *drafters, "--json"]) == 0
    section = json.loads(capsys.readouterr().out)["speculative"]
    assert section["drafters"] == ["main", 1]
    rows = section["rows"]
    assert [(r["kind"], r["drafter"]) for r in rows] == [
        ("greedy", "main"), ("greedy", 1), ("sampled", "main"), ("sampled", 1)
    ]  # fmt: skip
    assert rows[0]["standard_tokens_per_s"] == rows[1]["standard_tokens_per_s"]  # one run
    assert [r["same_tokens"] for r in rows] == [True] * 4
    bad = ["--speculative-drafters", "fast"]
    assert main(["bench", *member_args(tiny_folders), *one, *bad]) == 2
    assert (
        "--speculative-drafters: each must be main, auto, lookup or a member index, got 'fast'."
        in (capsys.readouterr().err)
    )
    task = ["--speculative-task", "arithmetic", "--speculative-batch-sizes", "1", "--json"]
    assert (
        main(["bench", *member_args(tiny_folders), *one, *task, "--speculative-groups", "3"]) == 0
    )
    section = json.loads(capsys.readouterr().out)["speculative"]
    assert (section["prompts"], section["groups"]) == ("arithmetic", 3)
    assert section["rows"][0]["same_tokens"] is True and section["rows"][0]["batch_size"] == 1
    assert main(["bench", *member_args(tiny_folders), *one, "--speculative-groups", "0"]) == 2
    assert "--speculative-groups must be >= 1, got 0." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", *member_args(tiny_folders), *one, "--speculative-task", "poems"])
    assert "invalid choice: 'poems'" in capsys.readouterr().err


def test_task_prompts_are_the_evals_test_prompts():
    from deepen_engine.commands.bench.speculative import task_prompts
    from deepen_engine.commands.eval.task import split_questions
    from deepen_engine.commands.eval.tasks import TASKS

    prompts = task_prompts("capitals", 3)
    split = split_questions(TASKS["capitals"].load(), seed=0, shots=4, dev_size=50)
    first = split.test[0]
    assert len(prompts) == 3 and prompts[0].count("\n\n") == 4
    assert prompts[0].endswith(TASKS["capitals"].template.format(subject=first.subject))
    assert split.shots[0].answer in prompts[0]


# --- another member drafts (`GenerationConfig.drafter`, decoding/cross_drafts.py) ----------


@pytest.mark.parametrize("main", [0, 1], ids=["bpe-main", "sp-main"])
@pytest.mark.parametrize("method", METHODS)
def test_helper_drafter_greedy_output_equals_plain_decoding(
    tiny_ensemble, plain_greedy, method, main
):
    view = tiny_ensemble.view({"method": method, "main": main})
    base = plain_greedy(method, main)
    accepted = 0
    for k in (2, 4, 8):
        out = view.generate(PROMPTS, max_new_tokens=24, speculate=k, drafter=1 - main)
        _same(base, out)
        drafted, kept = _usage(out)
        assert drafted > kept  # some proposals were rejected: both paths ran
        accepted += kept
    # the deepen fusion barely moves off the main member, and the tiny random members
    # never agree in that direction: there every proposal is rejected
    assert accepted > 0 or (method, main) == ("deepen", 1)


def test_helper_drafter_with_stops_streaming_logprobs_and_the_gate(tiny_ensemble):
    view = tiny_ensemble.view({"main": 0, "method": "union"})
    plain = view.generate(PROMPTS, max_new_tokens=30, speculate=0)
    stops = [r.text[len(r.text) // 2 : len(r.text) // 2 + 2] for r in plain if len(r.text) > 6]
    settings = {"max_new_tokens": 30, "stop": stops, "min_new_tokens": 5, "logprobs": 1}
    base = view.generate(PROMPTS, **settings, speculate=0)
    assert "stop" in [r.finish_reason for r in base]
    for k in (2, 8):
        out = view.generate(PROMPTS, speculate=k, drafter=1, **settings)
        _same(base, out)
        assert _usage(out)[1] > 0
        for a, b in zip(base, out):
            assert a.logprobs is not None and b.logprobs is not None
            assert [e.id for e in a.logprobs] == [e.id for e in b.logprobs]
    deltas = dict.fromkeys(range(len(PROMPTS)), "")
    for event in view.stream(PROMPTS, speculate=4, drafter=1, **settings):
        deltas[event.index] += event.delta
    assert list(deltas.values()) == [r.text for r in base]
    gated = tiny_ensemble.view({"gate": "agree", "gate_threshold": 0.05, "main": 0})
    base = gated.generate(PROMPTS, max_new_tokens=20, speculate=0)
    _same(base, gated.generate(PROMPTS, max_new_tokens=20, speculate=4, drafter="auto"))


def test_rows_of_different_drafters_joining_mid_flight_equal_each_alone(tiny_ensemble):
    view = tiny_ensemble.view({"method": "union"})  # main 0
    configs = [
        GenerationConfig(max_new_tokens=14, speculate=8, drafter=1),
        GenerationConfig(max_new_tokens=9, speculate=3, drafter="main"),
        GenerationConfig(max_new_tokens=16, speculate=2, drafter=1, stop=["e "]),
        GenerationConfig(max_new_tokens=12, speculate=4, drafter="auto", min_new_tokens=12),
    ]
    ids = _drive(view, {0: [0, 1], 2: [2], 5: [3]}, configs)
    assert sorted(ids) == [0, 1, 2, 3]
    for p, got in ids.items():
        plain = configs[p].model_copy(update={"speculate": 0})
        assert got == view.generate(PROMPTS[p], plain).token_ids


@pytest.mark.parametrize("main", [0, 1], ids=["bpe-main", "sp-main"])
def test_helper_drafter_roll_back_leaves_caches_equal_a_fresh_prefill(tiny_ensemble, main):
    """The drafter's cache holds its own drafted tokens until the step re-syncs it: after
    every step and advance each member's logits equal a fresh forward over its ids, and
    the drafter's ids equal its tokenisation of prompt + text."""
    checked = []

    def check(decoder):
        decoder.speculator.catch_up()
        for batch in decoder.batches:
            member = batch.member
            for b, row in enumerate(batch.rows):
                if member is not decoder.main_member:
                    text = decoder.rows[b].text.text
                    tail = member.tokenizer(text, add_special_tokens=False).input_ids
                    assert row.ids == row.prompt_ids + tail
                assert row.cached == len(row.ids)
                with torch.inference_mode():
                    fresh = member.model(input_ids=torch.tensor([row.ids])).logits[0, -1]
                torch.testing.assert_close(batch.logits[b], fresh.float(), atol=1e-4, rtol=1e-4)
                checked.append(member.name)

    view = tiny_ensemble.view({"main": main, "method": "union"})
    configs = [
        GenerationConfig(max_new_tokens=20, speculate=k, drafter=1 - main) for k in (8, 4, 2, 8)
    ]
    ids = _drive(view, {0: [0, 1, 2], 3: [3]}, configs, check)
    assert len(ids) == 4
    assert checked.count(tiny_ensemble.members[1 - main].name) > 10


def test_sampled_output_with_a_helper_drafter_equals_plain_sampling(tiny_ensemble):
    """The helper proposing its greedy text: kept where the fused choice is that text."""
    _assert_plain_sampling(tiny_ensemble, 20_000, drafter=0)


def test_acceptance_keeps_drafts_while_the_plain_choice_equals_them():
    fused = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))  # (P, V)
    sampler = Sampler(1.0, 0, 1.0)
    # inverse CDF in id order: position 0 picks 0 below 0.5, 1 below 0.8, else 2
    assert accept_draft(sampler, fused, [1], [0.6, 0.95]) == [1, 2]  # kept, then drawn
    assert accept_draft(sampler, fused, [1], [0.2, 0.95]) == [0]  # the plain choice
    assert accept_draft(sampler, fused[:1], [2], [0.9]) == [2]  # all kept, nothing after
    greedy = Sampler(0.0, 0, 1.0)
    assert accept_draft(greedy, fused, [0, 1], []) == [0, 1]
    assert accept_draft(greedy, fused, [1], []) == [0]


def test_the_sampler_draws_from_the_filtered_distribution():
    """Over many seeds, each token's share is its probability after temperature, top-k
    and top-p; a token they drop is never drawn; a row's number depends only on its
    seed and position."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    sampler = Sampler(0.8, 4, 0.9)
    want = sampler.probs(logits)[0]
    assert float(want[4]) == 0 and float(want[3]) == 0  # top-k, then top-p, drop them
    # the 4,000 seeds' rows in one batch (each row draws at its own number, as alone)
    uniforms = [position_uniform(seed, 7) for seed in range(4000)]
    drawn = sampler(logits.expand(4000, -1), uniforms)
    assert drawn[:50] == [sampler(logits, [u])[0] for u in uniforms[:50]]  # as drawn alone
    counts = torch.bincount(torch.tensor(drawn), minlength=5).float()
    assert counts[3] == 0 and counts[4] == 0
    assert torch.allclose(counts / 4000, want, atol=0.025)
    assert position_uniform(3, 7) == position_uniform(3, 7) != position_uniform(3, 8)
    assert position_uniform(3, 7) != position_uniform(4, 7)


def test_main_ids_keep_the_stable_prefix_of_the_draft(tiny_ensemble):
    for member in tiny_ensemble.members:
        texts = member.vocab.texts
        full = member.tokenizer(" capital of France", add_special_tokens=False).input_ids
        stable = member.tokenizer(" capital of", add_special_tokens=False).input_ids
        pieces = [b" capital", b" of", b" France"]
        got = main_ids(member, pieces, ended=False, limit=16)
        # the ids both texts share: the last piece may still merge with later text
        assert got == full[: common_prefix(full, stable)] and got
        assert (
            b"".join(texts[t] or b"" for t in got)
            == b" capital of France"[: sum(len(texts[t] or b"") for t in got)]
        )
        assert main_ids(member, pieces, ended=True, limit=16) == full  # the text is complete
        assert main_ids(member, pieces, ended=True, limit=2) == full[:2]
        assert (
            main_ids(member, [b" caf\xc3"], ended=True, limit=8)
            == member.tokenizer(" caf", add_special_tokens=False).input_ids
        )  # an incomplete character is cut


def test_drafter_choice_and_validation(tiny_ensemble):
    sizes = [20, 10, 10]  # parameter counts
    assert drafter_position("auto", sizes, [0, 1, 2], 0) == 1  # fewest; ties: lower index
    assert drafter_position("auto", [20, 10], [0, 2], 0) == 1  # positions among those run
    assert drafter_position("main", sizes, [0, 1, 2], 2) == 2
    assert drafter_position(2, sizes, [0, 1, 2], 0) == 2
    assert drafter_position(1, [20], [0], 0) == 0  # a member not run: the main drafts
    for bad in (-1, "fast", True, 1.5):
        with pytest.raises(ConfigError, match="drafter") as err:
            GenerationConfig(drafter=bad)
        assert err.value.field == "drafter"
    with pytest.raises(ConfigError, match=r"drafter=2 \(row 0\) is not a member index") as err:
        tiny_ensemble.generate("x", max_new_tokens=2, speculate=2, drafter=2)
    assert err.value.field == "drafter"
    parser = argparse.ArgumentParser(parents=[generation_options()])
    assert generation_settings(parser.parse_args(["--drafter", "1"])).drafter == 1
    assert generation_settings(parser.parse_args(["--drafter", "auto"])).drafter == "auto"
    assert generation_settings(parser.parse_args([])).drafter == "main"
    with pytest.raises(SystemExit):
        parser.parse_args(["--drafter", "fast"])
    assert parse_completion({"prompt": "x", "drafter": "auto"}).generation["drafter"] == "auto"
    tiny = tiny_ensemble.members
    auto = min(range(2), key=lambda i: (tiny[i].num_parameters, i))
    view = tiny_ensemble.view({"main": 1 - auto, "method": "union"})
    out = view.generate(PROMPTS, max_new_tokens=16, speculate=4, drafter="auto")
    assert out[0].usage.drafts > 0
    _same(view.generate(PROMPTS, max_new_tokens=16), out)
