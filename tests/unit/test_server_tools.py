"""Tool calls and structured output through the OpenAI-compatible server, on the tiny
members, served by uvicorn on loopback (the `server` and `client` fixtures of
tests/unit/conftest.py) and driven by the real `openai` client: what the
server answers equals what the engine answers for the same request (call ids aside: each
call gets a fresh one)."""

from __future__ import annotations

import json
from typing import Literal

import pytest

pytest.importorskip("starlette")
pytest.importorskip("openai")
pytest.importorskip("llguidance")

import httpx  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from tests.unit.test_tools import ANSWERED, ASK, WEATHER  # noqa: E402  (the same conversation)

PING = {"type": "function", "function": {"name": "ping", "description": "No arguments"}}
TOOLS = [WEATHER, PING]
UNIT_SCHEMA = {
    "type": "object",
    "properties": {"unit": {"enum": ["C", "F"]}},
    "required": ["unit"],
    "additionalProperties": False,
}


class Unit(BaseModel):
    unit: Literal["C", "F"]


@pytest.fixture(scope="module")
def chat_view(tiny_ensemble):
    """What the server runs a chat request on: the chat rule's main member."""
    return tiny_ensemble.with_fusion(main=tiny_ensemble.default_chat_main())


@pytest.mark.parametrize("seed", [0, 1])
def test_a_forced_tool_call_is_the_engines_call(client, chat_view, seed):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    settings = dict(max_tokens=80, temperature=1.0, seed=seed)
    reply = client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice=choice, **settings
    )
    expected = chat_view.generate(
        ASK, tools=TOOLS, tool_choice="get_weather", max_new_tokens=80, temperature=1.0, seed=seed
    )
    assert expected.finish_reason == "tool_calls"
    (want,) = expected.tool_calls
    out = reply.choices[0]
    assert out.finish_reason == "tool_calls"
    assert out.message.content is None
    (call,) = out.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == want.name == "get_weather"
    assert json.loads(call.function.arguments) == want.arguments

    # streamed: the call comes whole in one delta, then the finish chunk
    chunks = list(
        client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice=choice, stream=True, **settings
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]
    assert json.loads(deltas[0].function.arguments) == want.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_auto_and_none_answer_as_the_engine(client, chat_view):
    for tool_choice in ("auto", "none"):
        reply = client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=24
        )
        expected = chat_view.generate(ASK, tools=TOOLS, tool_choice=tool_choice, max_new_tokens=24)
        message = reply.choices[0].message
        if expected.tool_calls:
            assert [c.function.name for c in message.tool_calls] == [
                c.name for c in expected.tool_calls
            ]
        else:
            assert message.tool_calls is None and message.content == expected.text


def test_a_conversation_with_a_call_and_its_result(client, chat_view):
    history = ANSWERED
    reply = client.chat.completions.create(
        model="m", messages=history, tools=TOOLS, tool_choice="none", max_tokens=12
    )
    expected = chat_view.generate(history, tools=TOOLS, tool_choice="none", max_new_tokens=12)
    assert reply.choices[0].message.content == expected.text


def test_response_format_json_schema_and_parse(client, chat_view):
    reply = client.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "unit", "schema": UNIT_SCHEMA, "strict": True},
        },
    )
    expected = chat_view.generate(ASK, json_schema=UNIT_SCHEMA, max_new_tokens=40)
    text = reply.choices[0].message.content
    assert text == expected.text
    assert json.loads(text)["unit"] in ("C", "F")
    # the client's structured-output helper: a pydantic model in, a parsed instance out
    parsed = client.chat.completions.parse(
        model="m", messages=ASK, max_tokens=40, response_format=Unit
    )
    assert isinstance(parsed.choices[0].message.parsed, Unit)


def test_response_format_json_object_is_any_object(client, chat_view):
    reply = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=16, response_format={"type": "json_object"}
    )
    expected = chat_view.generate(ASK, json_schema={"type": "object"}, max_new_tokens=16)
    assert reply.choices[0].message.content == expected.text
    assert expected.text.startswith("{")


def test_regex_extra_field_constrains_completions(client, tiny_ensemble):
    reply = client.completions.create(
        model="m",
        prompt="Year:",
        max_tokens=8,
        extra_body={"regex": "(19|20)[0-9]{2}"},
    )
    expected = tiny_ensemble.generate("Year:", regex="(19|20)[0-9]{2}", max_new_tokens=8)
    assert reply.choices[0].text == expected.text
    assert len(expected.text) == 4 and expected.text[:2] in ("19", "20")


BAD = [
    ({"tools": {"name": "x"}}, "tools", "must be a list"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
    ({"tool_choice": "required"}, "tool_choice", "give tools too"),
    ({"tools": TOOLS, "tool_choice": "nope"}, "tool_choice", "is not 'auto'"),
    ({"functions": [{"name": "x"}]}, "functions", "legacy"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs {'json_schema'"),
    (
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        "response_format",
        "not both",
    ),
    (
        {"messages": [{"role": "function", "name": "f", "content": "1"}]},
        "messages[0].role",
        "legacy function messages",
    ),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{bad"}}],
                },
            ]
        },
        "messages",
        "arguments is not JSON",
    ),
]


@pytest.mark.parametrize(("extra", "param", "message"), BAD)
def test_bad_tool_and_format_fields_get_a_400_naming_them(server, extra, param, message):
    body = {"model": "m", "messages": ASK, "max_tokens": 4, **extra}
    reply = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
