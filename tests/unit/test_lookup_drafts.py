"""Prompt-lookup drafting (`drafter="lookup"`, decoding/lookup_drafts.py): the proposal
rule, greedy output identical to `speculate=0` on tiny members whose tokenizers split words
differently, sampled output distributed as plain sampling, and the setting everywhere a
user can give it."""

from __future__ import annotations

import argparse

import pytest

from deepen_engine import GenerationConfig
from deepen_engine.commands.options import generation_options, generation_settings
from deepen_engine.decoding.cross_drafts import drafter_position
from deepen_engine.decoding.lookup_drafts import LOOKUP, lookup_ids
from deepen_engine.errors import ConfigError
from deepen_engine.server.protocol import parse_completion
from tests.unit.test_speculative import (
    PROMPTS,
    _assert_plain_sampling,
    _drive,
    _same,
    _usage,
)

TEXTS = [b"t"] * 20 + [None]  # id 20 has no text
EOS = {19}
# prompts whose text repeats, so a row's last ids recur and lookup has something to propose
REPEATING = [
    "one two three, one two three, one two three, one two",
    "a = [1, 2, 3]\nb = [1, 2, 3]\nc = [1, 2,",
    "Q: 2 + 2?\nA: 4\n\nQ: 3 + 3?\nA: 6\n\nQ: 4 + 4?\nA:",
    "no repeats here at all",
]


def test_the_latest_occurrence_of_the_longest_tail():
    # [9, 1, 2] never occurred before; [1, 2] did (at 1) and so did [2] (at 5)
    assert lookup_ids([4, 1, 2, 8, 3, 2, 9, 1, 2], 3, TEXTS, EOS) == [8, 3, 2]
    # the latest of two occurrences of [1, 2]
    assert lookup_ids([1, 2, 5, 1, 2, 6, 7, 1, 2], 2, TEXTS, EOS) == [6, 7]
    assert lookup_ids([1, 2, 5, 1, 2, 6, 7, 1, 2], 9, TEXTS, EOS) == [6, 7, 1, 2]
    # cut before an end token or a token without text
    assert lookup_ids([1, 2, 3, 19, 1, 2, 3], 4, TEXTS, EOS) == []
    assert lookup_ids([3, 5, 20, 8, 3, 5], 4, TEXTS, EOS) == []
    assert lookup_ids([3, 5, 6, 20, 5], 4, TEXTS, EOS) == [6]  # after [5]; [3, 5] is not the tail
    assert lookup_ids([1, 2, 3], 4, TEXTS, EOS) == []  # nothing recurs
    assert lookup_ids([7], 4, TEXTS, EOS) == []


@pytest.mark.parametrize("main", [0, 1], ids=["bpe-main", "sp-main"])
def test_greedy_output_equals_plain_decoding(tiny_ensemble, main):
    view = tiny_ensemble.view({"main": main, "method": "union"})
    base = view.generate(REPEATING, max_new_tokens=24, speculate=0)
    for k in (2, 4, 8):
        out = view.generate(REPEATING, max_new_tokens=24, speculate=k, drafter="lookup")
        _same(base, out)
        drafted, _ = _usage(out)
        assert drafted > 0


def test_stops_streaming_and_rows_joining_mid_flight(tiny_ensemble):
    view = tiny_ensemble.view({"main": 0, "method": "union"})
    plain = view.generate(REPEATING, max_new_tokens=30, speculate=0)
    stops = [r.text[len(r.text) // 2 : len(r.text) // 2 + 2] for r in plain if len(r.text) > 6]
    settings = {"max_new_tokens": 30, "stop": stops, "logprobs": 1}
    base = view.generate(REPEATING, **settings, speculate=0)
    out = view.generate(REPEATING, speculate=4, drafter="lookup", **settings)
    _same(base, out)
    for a, b in zip(base, out):
        assert [e.id for e in a.logprobs] == [e.id for e in b.logprobs]
    deltas = dict.fromkeys(range(len(REPEATING)), "")
    for event in view.stream(REPEATING, speculate=4, drafter="lookup", **settings):
        deltas[event.index] += event.delta
    assert list(deltas.values()) == [r.text for r in base]
    configs = [
        GenerationConfig(max_new_tokens=14, speculate=8, drafter="lookup"),
        GenerationConfig(max_new_tokens=9, speculate=3, drafter="main"),
        GenerationConfig(max_new_tokens=16, speculate=2, drafter="lookup", stop=["e "]),
        GenerationConfig(max_new_tokens=12, speculate=4, drafter=1, min_new_tokens=12),
    ]
    ids = _drive(view, {0: [0, 1], 2: [2], 5: [3]}, configs)
    assert sorted(ids) == [0, 1, 2, 3]
    for p, got in ids.items():
        plain_config = configs[p].model_copy(update={"speculate": 0})
        assert got == view.generate(PROMPTS[p], plain_config).token_ids  # _drive's prompts


def test_sampled_output_equals_plain_sampling(tiny_ensemble):
    """Proposals are kept where the fused choice at the row's number is the proposal."""
    _assert_plain_sampling(tiny_ensemble, 30_000, REPEATING[0], drafter="lookup")


def test_the_setting_where_users_give_it():
    assert GenerationConfig(drafter="lookup").drafter == "lookup"
    with pytest.raises(ConfigError, match="'main' or 'auto' or 'lookup'") as err:
        GenerationConfig(drafter="lookups")
    assert err.value.field == "drafter"
    assert drafter_position("lookup", [20, 10], [0, 1], 0) == LOOKUP
    parser = argparse.ArgumentParser(parents=[generation_options()])
    assert generation_settings(parser.parse_args(["--drafter", "lookup"])).drafter == "lookup"
    request = parse_completion({"prompt": "x", "speculate": 4, "drafter": "lookup"})
    assert request.generation["drafter"] == "lookup"
