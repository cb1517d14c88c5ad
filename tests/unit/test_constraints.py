"""Grammar-constrained decoding on the fused distribution (decoding/constraints.py): every
constrained output parses and validates, constrained and free rows share a batch exactly,
end tokens wait for the grammar, `length` mid-structure, bad constraints raise.
"""

from __future__ import annotations

import json
import random
import re
import sys

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from deepen_engine import ConfigError, GenerationConfig  # noqa: E402
from deepen_engine.decoding.constraints import (  # noqa: E402
    RowConstraint,
    apply_masks,
    check_constraint,
    constraint_vocab,
)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A seeded JSON schema whose every instance is short: bounded strings, integers in a
    range, enums, booleans, small arrays and nested objects (no free properties)."""
    kinds = ["string", "integer", "enum", "boolean", "array"] + (["object"] if depth < 2 else [])
    properties = {}
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 6)}
        elif kind == "integer":
            low = rng.randint(-50, 50)
            prop = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 900)}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "Zürich", "東京", "x y"], 3)}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "array":
            prop = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
        else:
            prop = random_schema(rng, depth + 1)
        properties[f"p{i}_{kind}"] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(properties),
        "additionalProperties": False,
    }


@pytest.mark.parametrize("seed", range(8))
def test_every_constrained_output_validates(tiny_ensemble, seed):
    schema = random_schema(random.Random(seed))
    results = tiny_ensemble.generate(
        ["The capital of", "Q: What is 12 + 7?\nA:", "def add(a, b):"],
        max_new_tokens=160,
        json_schema=schema,
        temperature=1.0,
        seed=seed,
    )
    greedy = tiny_ensemble.generate("Once upon a time", max_new_tokens=160, json_schema=schema)
    for result in [*results, greedy]:
        assert result.finish_reason == "eos", (schema, result.text)
        jsonschema.validate(json.loads(result.text), schema)
        # json.dumps layout: ", " and ": ", no other whitespace outside strings
        assert json.dumps(json.loads(result.text), ensure_ascii=False) == result.text


def test_constrained_main_member_alone_and_other_main(tiny_ensemble):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    for view in (tiny_ensemble.with_fusion(eta=0), tiny_ensemble.with_fusion(main=1)):
        result = view.generate("Stop here.", max_new_tokens=40, json_schema=schema)
        assert result.finish_reason == "eos"
        assert json.loads(result.text)["ok"] in (True, False)


def test_regex_and_grammar_constraints(tiny_ensemble):
    result = tiny_ensemble.generate("Q:", max_new_tokens=30, regex=r"[0-9]{3}-[a-z]{2,4}")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", result.text)
    assert result.finish_reason == "eos"
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/\n'
    result = tiny_ensemble.generate("Q:", max_new_tokens=30, grammar=lark)
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", result.text)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_mixed_rows_equal_each_row_alone(tiny_ensemble, temperature):
    from deepen_engine.decoding.decode import decode  # noqa: F401  (the loop the batch runs)

    schema = random_schema(random.Random(3))
    prompts = ["The capital of", "Once upon a time", "Q: What is 3 * 4?\nA:"]
    configs = [
        GenerationConfig(max_new_tokens=40, json_schema=schema, temperature=temperature, seed=1),
        GenerationConfig(max_new_tokens=12, temperature=temperature, seed=2),
        GenerationConfig(max_new_tokens=20, regex="[a-z ]{3,12}!", temperature=temperature, seed=3),
    ]
    alone = [tiny_ensemble.generate(p, c) for p, c in zip(prompts, configs)]
    together = _one_batch(tiny_ensemble, prompts, configs)
    for a, t in zip(alone, together):
        assert (a.text, a.token_ids, a.finish_reason) == (t.text, t.token_ids, t.finish_reason)


def _one_batch(ens, prompts, configs):
    """Run rows with different configs in one batch of the decoding loop."""
    from deepen_engine.decoding.loop import BatchDecoder, NewRow
    from deepen_engine.outputs import collect

    decoder = BatchDecoder(ens.members, ens.fusion.main)
    rows = [
        NewRow(prompts=[(p, True)] * len(ens.members), config=c, fuser=ens.fuser, index=i)
        for i, (p, c) in enumerate(zip(prompts, configs))
    ]

    def events():
        try:
            decoder.join(decoder.prepare(rows))
            assert len(decoder.rows) == len(rows)
            while decoder.rows:
                for _, event in decoder.step():
                    yield event
                if decoder.rows:
                    decoder.advance()
        finally:
            decoder.close()

    return collect(events(), len(rows))


def test_streamed_equals_generated(tiny_ensemble):
    schema = random_schema(random.Random(5))
    result = tiny_ensemble.generate("The capital of", max_new_tokens=80, json_schema=schema)
    events = list(tiny_ensemble.stream("The capital of", max_new_tokens=80, json_schema=schema))
    assert "".join(e.delta for e in events) == result.text
    assert events[-1].finish_reason == result.finish_reason == "eos"


def test_length_mid_structure(tiny_ensemble):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    result = tiny_ensemble.generate("The capital of", max_new_tokens=3, json_schema=schema)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 3
    assert '{"name": "'.startswith(result.text) or result.text.startswith('{"name": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_end_tokens_masked_until_the_grammar_accepts(tiny_ensemble):
    main = tiny_ensemble.main
    vocab = constraint_vocab(main)
    row = RowConstraint(check_constraint("regex", "ab?"), vocab)
    width = len(main.vocab)
    eos = sorted(main.eos_ids)
    logits = torch.zeros(1, width)
    masked = apply_masks(logits, [row])
    assert torch.isinf(masked[0, eos]).all()  # nothing yet: no end
    a = main.tokenizer("a", add_special_tokens=False).input_ids
    assert len(a) == 1
    row.advance(a[0])
    masked = apply_masks(logits, [row])
    assert not torch.isinf(masked[0, eos]).any()  # "a" is complete: the end is allowed
    allowed = (~torch.isinf(masked[0])).nonzero().flatten().tolist()
    texts = {main.vocab.texts[i] for i in allowed if i not in main.eos_ids}
    assert texts == {b"b"}  # and so is "b", nothing else
    # a row without a constraint is left as it is
    both = apply_masks(torch.zeros(2, width), [None, row])
    assert not torch.isinf(both[0]).any()


def test_min_new_tokens_and_grammar(tiny_ensemble):
    result = tiny_ensemble.generate("Q:", max_new_tokens=20, min_new_tokens=2, regex="[a-z]{1,5}")
    assert re.fullmatch("[a-z]{1,5}", result.text)
    assert len(result.token_ids) >= 2


def test_special_tokens_never_allowed(tiny_ensemble):
    """Inside a structure only ids with text agreed by the engine and llguidance appear."""
    for member in tiny_ensemble.members:
        vocab = constraint_vocab(member)
        texts = member.vocab.texts
        text_ids = {i for i, t in enumerate(texts) if t is not None}
        agreed = set(vocab.agreed.nonzero().flatten().tolist())
        # both tokenizer kinds: every id with text is understood alike, specials are out;
        # but the lone byte 0xFF (never valid UTF-8), which llguidance uses to mark specials
        ff = {i for i, t in enumerate(texts) if t == b"\xff"}
        assert len(ff) == 1
        assert agreed == (text_ids - ff) | set(member.eos_ids)
        row = RowConstraint(check_constraint("json_schema", {"type": "string"}), vocab)
        row.advance(member.tokenizer('"', add_special_tokens=False).input_ids[0])
        masked = apply_masks(torch.zeros(1, len(texts)), [row])
        allowed = set((~torch.isinf(masked[0])).nonzero().flatten().tolist())
        assert allowed and allowed <= text_ids


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"json_schema": {"type": "foo"}}, r"GenerationConfig: json_schema cannot be compiled"),
        ({"json_schema": {"$ref": "#/nowhere"}}, r"json_schema cannot be compiled"),
        ({"regex": "a(b"}, r"GenerationConfig: regex cannot be compiled.*unclosed group"),
        ({"grammar": "start: x"}, r"GenerationConfig: grammar cannot be compiled.*unknown name"),
        ({"json_schema": {}, "regex": "a"}, r"at most one of json_schema, regex and grammar"),
    ],
)
def test_bad_constraints_raise(tiny_ensemble, settings, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**settings)
    with pytest.raises(ConfigError, match=match):
        tiny_ensemble.generate("Q:", max_new_tokens=4, **settings)


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ConfigError, match=r"pip install -U 'deepen\[constraints\]'"):
        GenerationConfig(json_schema={"type": "object"})
    GenerationConfig()  # no constraint: no import


def test_an_llguidance_older_than_1_7_says_how_to_upgrade(monkeypatch):
    # 1.6 took one EOS id where deepen passes the list (seen on a GPU machine's 1.6.1)
    import llguidance

    monkeypatch.setattr(llguidance, "__version__", "1.6.1", raising=False)
    with pytest.raises(ConfigError, match=r"llguidance >= 1\.7; 1\.6\.1 is installed\. Upgrade"):
        GenerationConfig(json_schema={"type": "object"})


def test_resumed_row_continues_its_grammar(tiny_ensemble):
    from deepen_engine.decoding.decode import decode
    from deepen_engine.outputs import collect

    config = GenerationConfig(max_new_tokens=30, regex="[a-z]{2,6} [0-9]{1,3}")
    whole = tiny_ensemble.generate("Q:", config)
    prompts = [[("Q:", True)] * len(tiny_ensemble.members)]
    events = decode(
        tiny_ensemble.members, tiny_ensemble.fuser, prompts, config, resume=[whole.token_ids[:2]]
    )
    (resumed,) = collect(events, 1)
    assert resumed.token_ids == whole.token_ids  # the resumed ids count in token_ids
    assert resumed.finish_reason == whole.finish_reason == "eos"
    assert re.fullmatch("[a-z]{2,6} [0-9]{1,3}", whole.text)


def _allowed_after(member, spec, text: str) -> set[bytes]:
    """The texts the grammar allows after `text`, fed one character at a time."""
    row = RowConstraint(spec, constraint_vocab(member))
    for ch in text:
        for token in member.tokenizer(ch, add_special_tokens=False).input_ids:
            row.advance(token)
    masked = apply_masks(torch.zeros(1, len(member.vocab.texts)), [row])
    allowed = (~torch.isinf(masked[0])).nonzero().flatten().tolist()
    return {member.vocab.texts[i] for i in allowed if i not in member.eos_ids}


def _one(kind: dict) -> dict:
    return {"type": "object", "properties": {"x": kind}, "required": ["x"]}


def test_numbers_are_bounded_by_default():
    from deepen_engine.grammar import JSON_FRACTION_DIGITS, JSON_INTEGER_DIGITS, bound_numbers

    assert (JSON_INTEGER_DIGITS, JSON_FRACTION_DIGITS) == (12, 6)
    big = 10**12 - 1
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "f": {"type": ["number", "null"]},
            "low": {"type": "integer", "minimum": 0},  # keeps its minimum, gains a maximum
            "own": {"type": "number", "exclusiveMaximum": 5, "multipleOf": 0.5},
            "items": {"type": "array", "items": {"type": "integer"}},
            "ref": {"$ref": "#/$defs/d"},
            "neither": {"not": {"type": "integer"}},  # a bound in `not` would widen it
        },
        "$defs": {"d": {"anyOf": [{"type": "number"}, {"type": "string"}]}},
    }
    out = bound_numbers(schema)
    props = out["properties"]
    assert props["n"] == {"type": "integer", "minimum": -big, "maximum": big}
    assert props["f"] == {"type": ["number", "null"], "minimum": -big, "maximum": big,
                          "multipleOf": 1e-6}  # fmt: skip
    assert props["low"] == {"type": "integer", "minimum": 0, "maximum": big}
    assert props["own"] == {"type": "number", "exclusiveMaximum": 5, "multipleOf": 0.5,
                            "minimum": -big}  # fmt: skip
    assert props["items"]["items"] == props["n"]
    assert out["$defs"]["d"]["anyOf"][0]["maximum"] == big
    assert props["neither"] == {"not": {"type": "integer"}}
    assert schema["properties"]["n"] == {"type": "integer"}  # the caller's schema is kept
    strings = bound_numbers({"anyOf": [{"type": "string"}, {"type": "string", "maxLength": 9},
                                       {"type": "string", "format": "date"}]})  # fmt: skip
    assert strings["anyOf"] == [
        {"type": "string", "pattern": "^(?:[0-9]{0,12}[^0-9])*[0-9]{0,12}$"},
        {"type": "string", "maxLength": 9},
        {"type": "string", "format": "date"},
    ]


def test_a_runaway_digit_string_must_end_at_the_digit_limit(tiny_ensemble):
    main = tiny_ensemble.main
    spec = check_constraint("json_schema", _one({"type": "string"}))
    digits = {str(d).encode() for d in range(10)}
    assert digits & _allowed_after(main, spec, '{"x": "21.5' + "0" * 10)  # a run of 11 digits
    after = _allowed_after(main, spec, '{"x": "21.5' + "0" * 11)  # 12: the limit
    assert not digits & after and b" " in after and b'"' in after


def test_a_runaway_integer_must_end_at_the_digit_limit(tiny_ensemble):
    main = tiny_ensemble.main
    spec = check_constraint("json_schema", _one({"type": "integer"}))
    digits = {str(d).encode() for d in range(10)}
    assert digits & _allowed_after(main, spec, '{"x": 1' + "0" * 10)  # 11 digits: one more
    after = _allowed_after(main, spec, '{"x": 1' + "0" * 11)  # 12 digits: the limit
    assert not digits & after and b"}" in after
    own = check_constraint("json_schema", _one({"type": "integer", "maximum": 10**15}))
    assert digits & _allowed_after(main, own, '{"x": 1' + "0" * 14)  # the schema's bound


def test_a_runaway_fraction_must_end_at_the_digit_limit(tiny_ensemble):
    main = tiny_ensemble.main
    spec = check_constraint("json_schema", _one({"type": "number"}))
    digits = {str(d).encode() for d in range(10)}
    assert digits & _allowed_after(main, spec, '{"x": 3.12345')
    after = _allowed_after(main, spec, '{"x": 3.123456')
    assert not digits & after and b"}" in after
    assert b"e" not in _allowed_after(main, spec, '{"x": 3')
