"""LlamaIndex tool calling and structured prediction on the engine's constraints, on the
tiny random members: forced calls parse and validate, agents run their tools, structured
outputs always validate.

(No `from __future__ import annotations`: LlamaIndex reads the tools' annotations.)
"""

import asyncio
from typing import Literal

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llama_index.core.base.llms.types import (  # noqa: E402
    ChatMessage,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.prompts import PromptTemplate  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from deepen_integrations.llama_index import DeepEnLLM, to_engine_messages  # noqa: E402

CALLS: list[tuple[int, int]] = []


def add(a: int = Field(ge=0, le=99), b: int = Field(ge=0, le=99)) -> int:
    """Add two small integers."""
    CALLS.append((a, b))
    return a + b


def weather(city: str = Field(max_length=8), unit: Literal["C", "F"] = "C") -> str:
    """The weather in a city."""
    return f"18 {unit} in {city}"


TOOLS = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(weather)]


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=150)
    role: Literal["pilot", "cook"]


@pytest.fixture
def llm(tiny_ensemble):
    return DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=120)


def _schema(name: str) -> dict:
    tool = {t.metadata.name: t for t in TOOLS}[name]
    return tool.metadata.get_parameters_dict()


def test_is_a_function_calling_model(llm):
    assert llm.metadata.is_function_calling_model is True


@pytest.mark.parametrize("seed", range(3))
def test_required_calls_parse_and_validate(tiny_ensemble, seed):
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=120, temperature=1.0, seed=seed)
    response = llm.chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    assert response.raw["finish_reason"] == "tool_calls"
    (selection,) = llm.get_tool_calls_from_response(response)
    jsonschema.validate(selection.tool_kwargs, _schema(selection.tool_name))
    assert selection.tool_id.startswith("call_")
    # the OpenAI-style copy for clients that read additional_kwargs
    (call,) = response.message.additional_kwargs["tool_calls"]
    assert call["function"]["name"] == selection.tool_name


def test_named_choice_streams_and_async(llm):
    kwargs = dict(user_msg="Weather in Rome?", tool_choice="weather")
    response = llm.chat_with_tools(TOOLS, **kwargs)
    (call,) = llm.get_tool_calls_from_response(response)
    assert call.tool_name == "weather"
    streamed = list(llm.stream_chat_with_tools(TOOLS, **kwargs))
    assert llm.get_tool_calls_from_response(streamed[-1])[0].tool_kwargs == call.tool_kwargs

    async def run():
        got = await llm.achat_with_tools(TOOLS, **kwargs)
        chunks = [r async for r in await llm.astream_chat_with_tools(TOOLS, **kwargs)]
        return got, chunks[-1]

    got, last = asyncio.run(run())
    for r in (got, last):
        assert llm.get_tool_calls_from_response(r)[0].tool_kwargs == call.tool_kwargs


def test_text_reply_has_no_tool_calls(llm):
    response = llm.chat_with_tools(TOOLS, user_msg="Hi", tool_choice="none")
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        llm.get_tool_calls_from_response(response)


def test_predict_and_call_runs_the_tool(llm):
    CALLS.clear()
    output = llm.predict_and_call([TOOLS[0]], user_msg="Add 2 and 3", tool_required=True)
    assert len(CALLS) == 1
    assert output.response == str(sum(CALLS[0]))


def test_function_agent_calls_its_tool_and_reads_the_result(tiny_ensemble):
    from llama_index.core.agent.workflow import FunctionAgent

    CALLS.clear()
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=60)
    agent = FunctionAgent(tools=[TOOLS[0]], llm=llm, initial_tool_choice="add")

    async def run():
        handler = agent.run(user_msg="What is 2 + 3?")
        return await handler, await handler.ctx.store.get("memory")

    output, memory = asyncio.run(run())
    assert len(CALLS) == 1  # the forced first reply called the tool, with valid arguments
    history = memory.get_all()
    tool_turn = [m for m in history if m.role == MessageRole.TOOL]
    assert tool_turn and tool_turn[0].content == str(sum(CALLS[0]))
    # the final answer was generated from a conversation holding the call and its result
    conversation = to_engine_messages(history[:-1])
    assert conversation[-2]["tool_calls"][0]["function"]["name"] == "add"
    assert conversation[-1] == {
        "role": "tool",
        "content": str(sum(CALLS[0])),
        "tool_call_id": conversation[-2]["tool_calls"][0]["id"],
        "name": None,
    }
    assert output.response.content == history[-1].content


def test_tool_call_messages_go_to_the_engine():
    messages = [
        ChatMessage(role=MessageRole.USER, content="2 + 3?"),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                TextBlock(text="Adding."),
                ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 2, "b": 3}),
            ],
        ),
        ChatMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": "c1"}),
    ]
    function = {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert to_engine_messages(messages)[1:] == [
        {
            "role": "assistant",
            "content": "Adding.",
            "tool_calls": [{"id": "c1", "type": "function", "function": function}],
        },
        {"role": "tool", "content": "5", "tool_call_id": "c1", "name": None},
    ]


@pytest.mark.parametrize("seed", range(3))
def test_structured_predict_always_validates(tiny_ensemble, seed):
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=120, temperature=1.0, seed=seed)
    prompt = PromptTemplate("Describe {who}.")
    person = llm.structured_predict(Person, prompt, who="Ada")
    assert isinstance(person, Person)

    async def run():
        return await llm.astructured_predict(Person, prompt, who="Ada")

    assert asyncio.run(run()) == person


def test_structured_predict_cut_short_says_to_raise_max_new_tokens(tiny_ensemble):
    from deepen_engine import OutputCutError

    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=3)
    prompt = PromptTemplate("Describe {who}.")
    with pytest.raises(OutputCutError, match=r"\(3 tokens\).*Raise max_new_tokens"):
        llm.structured_predict(Person, prompt, who="Ada")
    with pytest.raises(OutputCutError, match="Raise max_new_tokens"):
        asyncio.run(llm.astructured_predict(Person, prompt, who="Ada"))


def test_as_structured_llm(llm):
    structured = llm.as_structured_llm(Person)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content="Ada, a pilot")])
    assert isinstance(response.raw, Person)
    assert Person.model_validate_json(response.message.content) == response.raw


def test_structured_request_is_closed_and_described():
    from deepen_integrations.llama_index._structured import STRUCTURED_INSTRUCTION, _request

    messages, schema = _request(Person, PromptTemplate("Describe {who}."), {"who": "Ada"})
    assert schema["additionalProperties"] is False
    assert messages[0].content.startswith(STRUCTURED_INSTRUCTION.split("{schema}")[0])
    assert messages[-1].content == "Describe Ada."
