"""The soak's requests: the well-formed mix (chat and completion, streamed or not, tools,
a JSON schema) and the malformed bodies, each with the status the server must answer.
"""

from __future__ import annotations

from typing import Any

SOAK_KINDS = ("chat", "completion", "tools", "json_schema")
"""The well-formed request kinds (`--soak-kinds`)."""
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

_QUESTIONS = (
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Write one short sentence about the sea.",
    "What is two plus two?",
)
_TEXTS = (
    "The capital of Japan is",
    "Once upon a time, in a small village by the sea,",
    "def add(a, b):\n    ",
    "The river runs",
)
_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def good_request(kind: str, i: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """`(path, body)` of well-formed request `i` of `kind` (greedy, so its answer is fixed)."""
    question = [{"role": "user", "content": _QUESTIONS[i % len(_QUESTIONS)]}]
    if kind == "chat":
        return CHAT, {"messages": question, "max_tokens": max_tokens}
    if kind == "completion":
        return COMPLETIONS, {"prompt": _TEXTS[i % len(_TEXTS)], "max_tokens": max_tokens}
    if kind == "tools":
        ask = [{"role": "user", "content": f"What is the weather in city number {i % 3}?"}]
        body = {"messages": ask, "tools": [_WEATHER], "tool_choice": "required"}
        return CHAT, {**body, "max_tokens": max_tokens}
    if kind == "json_schema":
        schema = {"name": "person", "schema": _PERSON}
        ask = [{"role": "user", "content": "Describe a person as JSON."}]
        fmt = {"type": "json_schema", "json_schema": schema}
        return CHAT, {"messages": ask, "response_format": fmt, "max_tokens": max_tokens}
    raise ValueError(f"unknown request kind {kind!r}")


_M = [{"role": "user", "content": "hi"}]

# (path, body: a JSON value, or bytes sent as they are, expected status)
MALFORMED: list[tuple[str, Any, int]] = [
    (CHAT, b"{not json", 400),
    (CHAT, b"\xff\xfe", 400),
    (CHAT, [], 400),
    (CHAT, {}, 400),
    (CHAT, {"messages": []}, 400),
    (CHAT, {"messages": "hi"}, 400),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400),
    (CHAT, {"messages": _M, "max_tokenz": 3}, 400),
    (CHAT, {"messages": _M, "temperature": -1}, 400),
    (CHAT, {"messages": _M, "top_p": 0}, 400),
    (CHAT, {"messages": _M, "max_tokens": 0}, 400),
    (CHAT, {"messages": _M, "n": 2}, 400),
    (CHAT, {"messages": _M, "stream": "yes"}, 400),
    (CHAT, {"messages": _M, "stop": [""]}, 400),
    (CHAT, {"messages": _M, "eta": -1}, 400),
    (CHAT, {"messages": _M, "method": "vote"}, 400),
    (CHAT, {"messages": _M, "main": 7}, 400),
    (CHAT, {"messages": _M, "weights": [1, 2, 3]}, 400),
    (CHAT, {"messages": _M, "response_format": {"type": "xml"}}, 400),
    (CHAT, {"messages": _M, "tool_choice": "required"}, 400),
    (CHAT, {"messages": _M, "tools": "nope"}, 400),
    (CHAT, {"messages": _M, "logit_bias": {"1": 5}}, 400),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, 400),
    (COMPLETIONS, {"prompt": ""}, 400),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, 400),
    (COMPLETIONS, {"prompt": "x", "echo": True}, 400),
    (COMPLETIONS, {"prompt": "x", "messages": _M}, 400),
]
