"""Chat prompts: each member's own template, the fallbacks, validation, end-of-turn ids."""

from __future__ import annotations

import copy

import pytest
import torch

from deepen_engine import ConfigError, Ensemble, MemberSpec, load_member
from deepen_engine.decoding.chat import check_messages, render
from tests.conftest import CHATML

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_member_template_and_fallbacks(bpe_tokenizer, sp_tokenizer):
    assert render(bpe_tokenizer, MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No template, no Gemma turn tokens: a plain transcript.
    assert render(sp_tokenizer, MESSAGES) == (
        "System: Be brief.\n\nUser: Capital of France?\n\nAssistant: Paris.\n\n"
        "User: And of Italy?\n\nAssistant:"
    )
    # No template but Gemma's turn tokens (the Gemma-3-270m GGUF): Gemma's format.
    gemma_like = copy.deepcopy(sp_tokenizer)
    gemma_like.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    assert render(gemma_like, MESSAGES) == (
        "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n"
    )
    # A template given for the member wins over everything.
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>"
    assert (
        render(sp_tokenizer, MESSAGES[:2], own)
        == "[system] Be brief.\n[user] Capital of France?\n>>"
    )


def test_end_of_turn_token_ends_a_reply(tiny_pair, sp_tokenizer):
    gemma_like = copy.deepcopy(sp_tokenizer)
    gemma_like.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    model = tiny_pair[1][0]
    member = load_member(MemberSpec(source=(model, gemma_like), name="g"))
    assert gemma_like.convert_tokens_to_ids("<end_of_turn>") in member.eos_ids
    assert gemma_like.eos_token_id in member.eos_ids


def test_ensemble_renders_each_members_template(tiny_ensemble, tiny_pair):
    rendered = tiny_ensemble.render(MESSAGES[:2])
    assert rendered == [
        render(tiny_pair[0][1], MESSAGES[:2]),
        render(tiny_pair[1][1], MESSAGES[:2]),
    ]
    assert rendered[0].startswith("<|im_start|>system") and rendered[1].startswith("System:")


def test_chat_generation_continues_each_members_own_prompt(tiny_ensemble):
    alone = tiny_ensemble.with_fusion(eta=0)
    member = alone.members[0]
    result = alone.generate(MESSAGES[:2], max_new_tokens=10)
    ids = member.tokenizer(
        alone.render(MESSAGES[:2])[0], add_special_tokens=False, return_tensors="pt"
    ).input_ids
    out = member.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
        eos_token_id=sorted(member.eos_ids), pad_token_id=0,
    )  # fmt: skip
    expected = out[0, ids.shape[1] :].tolist()
    if expected[-1] in member.eos_ids:
        expected = expected[:-1]
    assert result.token_ids == expected
    assert result.usage.prompt_tokens["tiny-llama"] == ids.shape[1]


def test_chat_batch_mixes_with_text_prompts(tiny_ensemble):
    chat = tiny_ensemble.generate(MESSAGES[:2], max_new_tokens=8)
    text = tiny_ensemble.generate("Hello", max_new_tokens=8)
    both = tiny_ensemble.generate([MESSAGES[:2], "Hello"], max_new_tokens=8)
    assert [r.token_ids for r in both] == [chat.token_ids, text.token_ids]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user"}], "needs a 'content' string"),
        (["hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ConfigError, match=match):
        check_messages(messages)


def test_bad_messages_through_generate(tiny_ensemble):
    before = tiny_ensemble.generate(MESSAGES[:2], max_new_tokens=6).token_ids
    with pytest.raises(ConfigError, match="role 'robot'"):
        tiny_ensemble.generate([{"role": "robot", "content": "hi"}])
    # the refused request left nothing behind: the same chat gives the same ids
    assert tiny_ensemble.generate(MESSAGES[:2], max_new_tokens=6).token_ids == before


def test_default_chat_main_is_the_first_member_with_a_template(tiny_pair):
    llama, gemma = tiny_pair  # the BPE tokenizer has a ChatML template, the SP one none
    base_first = Ensemble(
        [MemberSpec(source=gemma, name="g"), MemberSpec(source=llama, name="l")], min_anchors=50
    )
    assert base_first.default_chat_main() == 1
    assert base_first.with_fusion(main=1).default_chat_main() == 1
    # requests with tools: the chat member under main="auto" (the default), else the main
    assert base_first.tools_main() == 1
    assert base_first.with_fusion(main=0).tools_main() == 0
    given = Ensemble(
        [MemberSpec(source=gemma, name="g", chat_template=CHATML), MemberSpec(source=llama)],
        min_anchors=50,
    )
    assert given.default_chat_main() == 0  # a MemberSpec template counts


def test_default_chat_main_without_templates_keeps_the_main_member(tiny_pair, sp_tokenizer):
    from tests.conftest import tiny_gemma3

    other = tiny_gemma3(len(sp_tokenizer), seed=5)
    ens = Ensemble(
        [MemberSpec(source=tiny_pair[1], name="g"), MemberSpec(source=(other, sp_tokenizer))],
        min_anchors=50,
        main=1,
    )
    assert ens.default_chat_main() == 1
