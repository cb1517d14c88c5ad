"""`deepen serve` on the default members: uvicorn on loopback, driven by the real `openai`
client, LangChain's `ChatOpenAI` and LlamaIndex's `OpenAILike`; 32 concurrent clients
get exactly their one-by-one greedy outputs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402

from deepen_engine import Ensemble  # noqa: E402
from tests.conftest import IDLE  # noqa: E402

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
N = 16


@pytest.fixture(scope="module")
def ensemble(default_ensemble) -> Ensemble:
    return default_ensemble  # loaded once per run (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def server(default_server):
    return default_server  # one server per run, on the session's ensemble


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat_answer(ensemble):
    view = ensemble.with_fusion(main=ensemble.default_chat_main())
    return view.generate(MESSAGES, max_new_tokens=N)


def test_openai_chat_whole_and_streamed(client, chat_answer):
    reply = client.chat.completions.create(model="deepen-default", messages=MESSAGES, max_tokens=N)
    assert reply.choices[0].message.content == chat_answer.text
    assert reply.usage.completion_tokens == chat_answer.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="deepen-default",
            messages=MESSAGES,
            max_tokens=N,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_answer.text
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_openai_completions(client, ensemble):
    prompt = "The capital of Italy is"
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=N)
    assert reply.choices[0].text == ensemble.generate(prompt, max_new_tokens=N).text


def test_langchain_chat_openai(server, chat_answer):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=server + "/v1", api_key="unused", model="deepen-default", max_tokens=N,
        stream_usage=True, max_retries=0,
    )  # fmt: skip
    message = chat.invoke(MESSAGES[0]["content"])
    assert message.content == chat_answer.text
    streamed = [c for c in chat.stream(MESSAGES[0]["content"])]
    assert "".join(c.content for c in streamed) == chat_answer.text
    merged = streamed[0]
    for c in streamed[1:]:
        merged = merged + c
    assert merged.usage_metadata["output_tokens"] == chat_answer.usage.completion_tokens


def test_llama_index_openai_like(server, chat_answer):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        api_base=server + "/v1", api_key="unused", model="deepen-default", is_chat_model=True,
        max_tokens=N, max_retries=0,
    )  # fmt: skip
    reply = llm.chat([ChatMessage(role="user", content=MESSAGES[0]["content"])])
    assert reply.message.content == chat_answer.text
    streamed = list(llm.stream_chat([ChatMessage(role="user", content=MESSAGES[0]["content"])]))
    assert streamed[-1].message.content == chat_answer.text


def test_tool_calls_and_structured_output_through_chat_openai(server, ensemble):
    """What agents send: `bind_tools` with a required call and `with_structured_output`
    (json_schema) through LangChain's OpenAI client; the calls parse on the default members
    and equal the engine's."""
    pytest.importorskip("llguidance")
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        """Get the current weather in a city."""

        city: str

    chat = ChatOpenAI(
        base_url=server + "/v1", api_key="unused", model="deepen-default", max_tokens=48,
        max_retries=0,
    )  # fmt: skip
    ask = "What is the weather in Paris?"
    message = chat.bind_tools([Weather], tool_choice="Weather").invoke(ask)
    (call,) = message.tool_calls
    view = ensemble.with_fusion(main=ensemble.default_chat_main())
    tools = [convert_to_openai_tool(Weather)]  # what bind_tools sends
    expected = view.generate(
        [{"role": "user", "content": ask}], tools=tools, tool_choice="Weather", max_new_tokens=48
    )
    assert expected.finish_reason == "tool_calls"
    assert call["name"] == "Weather" and call["args"] == expected.tool_calls[0].arguments
    assert isinstance(call["args"]["city"], str)
    structured = chat.with_structured_output(Weather, method="json_schema").invoke(ask)
    assert isinstance(structured, Weather)


def test_32_concurrent_clients_get_their_one_by_one_outputs(server, ensemble):
    prompts = [f"Question {i}: what is {i} + {i + 1}? Answer:" for i in range(32)]
    alone = [ensemble.generate(p, max_new_tokens=8).text for p in prompts]
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(prompt: str) -> str:
        return client.completions.create(model="m", prompt=prompt, max_tokens=8).choices[0].text

    with ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_a_client_that_disconnects_mid_stream_leaves_no_row(server, ensemble):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "min_tokens": 200, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 60
    while ensemble.queue_state()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ensemble.queue_state() == IDLE
