"""Reliability, long prompts: members with small context windows (main 48 positions,
helper 40). A prompt that fills some member's window is refused by default, naming that
member; `truncation="left"` drops each member's oldest prompt tokens instead (BOS kept);
generation ends with `"length"` once any member's window is full, and no member is ever
fed past its window."""

from __future__ import annotations

import pytest

from deepen_engine import ConfigError, Ensemble, MemberSpec
from deepen_engine.decoding import member_batch as sync
from tests.conftest import IDLE, plain_greedy_ids, tiny_gemma3, tiny_llama

MAIN_WINDOW, HELPER_WINDOW = 48, 40


@pytest.fixture(scope="module")
def small_members(bpe_tokenizer, sp_tokenizer):
    """The conftest tiny members (same seeds, so the same weights) with small windows."""
    llama = tiny_llama(len(bpe_tokenizer), max_positions=MAIN_WINDOW)
    gemma = tiny_gemma3(len(sp_tokenizer), max_positions=HELPER_WINDOW)
    return (llama, bpe_tokenizer), (gemma, sp_tokenizer)


@pytest.fixture(scope="module")
def small(small_members):
    return Ensemble(
        [
            MemberSpec(source=small_members[0], name="llama-48"),
            MemberSpec(source=small_members[1], name="gemma-40"),
        ],
        min_anchors=50,
    )


@pytest.fixture
def fed_lengths(monkeypatch):
    """Records, per member, the longest row a forward pass was asked to hold."""
    longest: dict[str, int] = {}
    original = sync.MemberBatch.forward

    def recording(self, *args, **kwargs):
        name = self.member.name
        longest[name] = max([longest.get(name, 0), *(len(r.ids) for r in self.rows)])
        original(self, *args, **kwargs)

    monkeypatch.setattr(sync.MemberBatch, "forward", recording)
    return longest


def test_a_prompt_filling_the_smallest_window_is_refused_naming_that_member(small):
    prompt = "x " * 21  # 42 tokens in both members: fits the main (48), not the helper (40)
    with pytest.raises(
        ConfigError,
        match=r"Prompt 0 is 42 tokens long in member 'gemma-40', whose context holds 40; "
        r"shorten the prompt, or pass truncation='left'",
    ):
        small.generate(prompt, max_new_tokens=4)
    assert small.queue_state() == IDLE
    assert small.generate("x " * 5, max_new_tokens=4).finish_reason == "length"


def test_left_truncation_keeps_the_newest_tokens(small_members, tiny_pair):
    ens = Ensemble([MemberSpec(source=small_members[0], name="llama-48")])
    tokenizer = small_members[0][1]
    prompt = "The capital of France is Paris. " * 8  # ~58 tokens
    ids = tokenizer(prompt).input_ids
    assert len(ids) > MAIN_WINDOW
    result = ens.generate(prompt, max_new_tokens=8, truncation="left")
    kept = MAIN_WINDOW - 8
    assert result.usage.prompt_tokens == {"llama-48": kept}
    assert result.token_ids == plain_greedy_ids(tiny_pair[0][0], ids[-kept:], 8)
    assert result.finish_reason == "length"


def test_left_truncation_keeps_a_leading_bos(small_members, tiny_pair):
    ens = Ensemble([MemberSpec(source=small_members[1], name="gemma-40")])
    tokenizer = small_members[1][1]
    prompt = "<bos>" + "Berlin is the capital of Germany. " * 6
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) > HELPER_WINDOW
    result = ens.generate(prompt, max_new_tokens=6, truncation="left")
    kept = [ids[0], *ids[-(HELPER_WINDOW - 6 - 1) :]]
    assert result.usage.prompt_tokens == {"gemma-40": HELPER_WINDOW - 6}
    assert result.token_ids == plain_greedy_ids(tiny_pair[1][0], kept, 6)


def test_left_truncation_cuts_each_member_to_its_own_window(small, fed_lengths):
    prompt = "the quick brown fox " * 12  # 22 tokens per 100 characters: past both windows
    result = small.generate(prompt, max_new_tokens=8, truncation="left")
    assert result.usage.prompt_tokens == {"llama-48": 40, "gemma-40": 32}
    assert fed_lengths["llama-48"] <= MAIN_WINDOW and fed_lengths["gemma-40"] <= HELPER_WINDOW
    # a prompt that leaves room for max_new_tokens is not cut
    short = small.generate("the quick brown fox", max_new_tokens=8, truncation="left")
    assert (
        short.usage.prompt_tokens
        == small.generate("the quick brown fox", max_new_tokens=8).usage.prompt_tokens
    )


def test_left_truncation_without_room_for_the_reply(small):
    with pytest.raises(
        ConfigError,
        match=r"max_new_tokens=40 leaves no room for prompt 0 in member 'gemma-40', whose "
        r"context holds 40; lower max_new_tokens below 40",
    ):
        small.generate("x " * 30, max_new_tokens=40, truncation="left")


def test_generation_ends_with_length_when_the_window_is_full(small_members, tiny_pair, fed_lengths):
    ens = Ensemble([MemberSpec(source=small_members[0], name="llama-48")])
    prompt = "x " * 20  # 40 tokens
    result = ens.generate(prompt, max_new_tokens=30)
    # ids 0..47 are fed; the token chosen from the last position is the 9th and last
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == MAIN_WINDOW - 40 + 1
    ids = small_members[0][1](prompt).input_ids
    assert result.token_ids == plain_greedy_ids(tiny_pair[0][0], ids, MAIN_WINDOW - 40 + 1)
    assert fed_lengths["llama-48"] == MAIN_WINDOW


def test_a_full_helper_ends_the_row_before_the_main_member_is_full(small, fed_lengths):
    prompt = "x " * 15  # 30 tokens in both
    result = small.generate(prompt, max_new_tokens=40)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens < MAIN_WINDOW - 30  # the helper (40) was first
    assert fed_lengths["gemma-40"] <= HELPER_WINDOW
    assert fed_lengths["llama-48"] < MAIN_WINDOW
    events = list(small.stream(prompt, max_new_tokens=40))
    assert "".join(e.delta for e in events) == result.text
    assert events[-1].finish_reason == "length"


def test_rows_that_fill_their_window_finish_alone_in_a_batch(small):
    prompts = ["x " * 15, "Q:", "The capital of France is", "x " * 18]
    alone = [small.generate(p, max_new_tokens=16) for p in prompts]
    batched = small.generate(prompts, max_new_tokens=16)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
    assert alone[3].usage.completion_tokens < 16 and alone[3].finish_reason == "length"


def test_the_integrations_pass_truncation_through(small):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from deepen_integrations.langchain import DeepEnLLM as LangChainLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    prompt = "the quick brown fox " * 12
    expected = small.generate(prompt, max_new_tokens=6, truncation="left").text
    langchain = LangChainLLM(ensemble=small, max_tokens=6)
    llama_index = LlamaIndexLLM(ensemble=small, max_new_tokens=6)
    with pytest.raises(ConfigError, match="truncation='left'"):
        langchain.invoke(prompt)
    with pytest.raises(ConfigError, match="truncation='left'"):
        llama_index.complete(prompt)
    assert langchain.invoke(prompt, truncation="left") == expected
    assert LangChainLLM(ensemble=small, max_tokens=6, truncation="left").invoke(prompt) == expected
    assert llama_index.complete(prompt, truncation="left").text == expected
    with pytest.raises(ValueError, match="truncation"):
        LlamaIndexLLM(ensemble=small, truncation="middle")
    with pytest.raises(ValueError, match="truncation"):
        LangChainLLM(ensemble=small, truncation="middle")
