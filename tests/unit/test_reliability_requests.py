"""Reliability, requests: malformed prompts and settings raise `ConfigError` (a
`ValueError`) before the ensemble is taken; the odd-but-valid prompts (whitespace only,
special-token text) generate normally; bytes of an incomplete UTF-8 character left at the
end of generation come out as U+FFFD."""

from __future__ import annotations

import pytest

from deepen_engine import ConfigError
from deepen_engine.decoding import loop as decoding
from tests.conftest import IDLE

N = 8


def _refused(ens, prompt, match, **settings):
    with pytest.raises(ConfigError, match=match):
        ens.generate(prompt, max_new_tokens=N, **settings)
    assert ens.queue_state() == IDLE


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", r"prompt at position 0 is an empty string; give some text"),
        (["Hi", ""], r"prompt at position 1 is an empty string"),
        ([], r"non-empty list of those; got list"),
        (123, r"prompt must be a str, a chat conversation .* got int"),
        (None, r"got NoneType"),
        (b"Hi", r"got bytes"),
        ({"role": "user", "content": "Hi"}, r"got dict"),
        (["Hi", 7], r"got int at position 1"),
    ],
)
def test_bad_prompts(tiny_ensemble, prompt, match):
    _refused(tiny_ensemble, prompt, match)


def test_empty_prompt_is_refused_by_every_entry_point(tiny_ensemble):
    with pytest.raises(ConfigError, match="empty string"):
        tiny_ensemble.stream("")
    with pytest.raises(ConfigError, match="empty string"):
        list(tiny_ensemble.with_fusion(eta=0).stream([""]))

    async def agen():
        return [e async for e in tiny_ensemble.astream("")]

    import asyncio

    with pytest.raises(ConfigError, match="empty string"):
        asyncio.run(agen())


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "wizard", "content": "Hi"}], r"messages\[0\] has role 'wizard'; use one of"),
        ([{"role": "user"}], r"messages\[0\] needs a 'content' string, got None"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}],
            r"messages\[1\] needs a 'content' string, got 3",
        ),
        ([{"role": "user", "content": "Hi"}, "Hello"], r"messages\[1\] must be a dict, got str"),
        ([[]], r"messages must be a non-empty list"),
    ],
)
def test_bad_messages(tiny_ensemble, messages, match):
    _refused(tiny_ensemble, messages, match)


@pytest.mark.parametrize("prompt", [" ", "\n\n\t "])
def test_whitespace_only_prompts_generate_like_any_text(tiny_ensemble, prompt):
    alone = tiny_ensemble.generate(prompt, max_new_tokens=N)
    assert alone.finish_reason in {"length", "eos", "stop"}
    assert all(n > 0 for n in alone.usage.prompt_tokens.values())
    batched = tiny_ensemble.generate(["The capital of France is", prompt], max_new_tokens=N)
    assert batched[1].token_ids == alone.token_ids
    assert batched[1].text == alone.text


def test_special_token_text_is_read_as_each_members_own_tokens(tiny_ensemble):
    # "<|im_start|>" is a special token of the byte-level member and plain text to the
    # SentencePiece one: each member reads the prompt with its own tokenizer.
    result = tiny_ensemble.generate("<|im_start|>", max_new_tokens=N)
    llama, gemma = tiny_ensemble.members
    assert result.usage.prompt_tokens["tiny-llama"] == 1
    assert (
        result.usage.prompt_tokens["tiny-gemma"]
        == len(gemma.tokenizer("<|im_start|>").input_ids)
        > 1
    )
    assert result.usage.completion_tokens >= 1
    # the main member's end token as prompt text ends nothing: it is prompt, not output
    ends = tiny_ensemble.generate("<|im_end|>", max_new_tokens=N)
    assert ends.usage.completion_tokens >= 1
    assert ends.text == llama.tokenizer.decode(ends.token_ids)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"max_new_tokens": 0},
            r"GenerationConfig.max_new_tokens: .*greater than or equal to 1, got 0",
        ),
        (
            {"max_new_tokens": -5},
            r"GenerationConfig.max_new_tokens: .*greater than or equal to 1, got -5",
        ),
        ({"stop": [""]}, r"GenerationConfig.stop: stop strings must not be empty, got \[''\]"),
        ({"stop": ["x", ""]}, r"stop strings must not be empty"),
        ({"stop": "x"}, r"GenerationConfig.stop: Input should be a valid list, got 'x'"),
        ({"temperature": -1}, r"GenerationConfig.temperature"),
        ({"top_p": 0}, r"GenerationConfig.top_p: .*greater than 0, got 0"),
        ({"top_k": -1}, r"GenerationConfig.top_k"),
        ({"truncation": "right"}, r"GenerationConfig.truncation: .*'error' or 'left', got 'right'"),
        ({"max_tokens": 4}, r"GenerationConfig has no setting 'max_tokens'"),
    ],
)
def test_bad_settings(tiny_ensemble, settings, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ensemble.generate("Hi", **settings)
    assert tiny_ensemble.queue_state() == IDLE


def test_bad_batch_size(tiny_ensemble):
    _refused(tiny_ensemble, ["Hi", "Ho"], r"batch_size must be >= 1, got 0", batch_size=0)


# ------------------------------------------------------------------ incomplete UTF-8


class _Scripted:
    """Stands in for the Sampler: returns the scripted main-member ids, one per step."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)

    def __call__(self, temperature, top_k, top_p):  # noqa: ARG002 - Sampler's signature
        script = self.script

        def choose(logits, generators):
            return [script.pop(0) for _ in generators]

        return choose


def _id(ens, text: bytes) -> int:
    return ens.members[0].vocab.texts.index(text)


@pytest.mark.parametrize(
    ("pieces", "end", "text", "reason"),
    [
        ([b"a", b"\xc3"], None, "a\ufffd", "length"),  # cut inside "ü": the byte is flushed
        ([b"a", b"\xc3"], "eos", "a\ufffd", "eos"),
        ([b"\xc3", b"\xbc"], None, "\u00fc", "length"),  # completed: "ü"
        ([b"a", b"\xf0", b"\x9f"], None, "a\ufffd", "length"),  # two bytes of a 4-byte char
    ],
)
def test_incomplete_utf8_at_the_end(tiny_ensemble, monkeypatch, pieces, end, text, reason):
    ens = tiny_ensemble
    ids = [_id(ens, p) for p in pieces]
    script = ids + ([min(ens.members[0].eos_ids)] if end == "eos" else [])
    monkeypatch.setattr(decoding, "Sampler", _Scripted(script))
    # standard steps: the scripted Sampler stands in for the plain choice only
    result = ens.generate("Q:", max_new_tokens=len(script), speculate=0)
    assert (result.text, result.finish_reason, result.token_ids) == (text, reason, ids)
    # streamed: the same text, and no replacement character before the final events
    monkeypatch.setattr(decoding, "Sampler", _Scripted(script))
    events = list(ens.stream("Q:", max_new_tokens=len(script), speculate=0))
    assert "".join(e.delta for e in events) == text
    assert events[-1].finish_reason == reason
    assert all("\ufffd" not in e.delta for e in events if e.delta != events[-2].delta)
