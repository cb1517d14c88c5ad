"""Tool calling for `ChatDeepEn`: the members have no native tool calling, so tools are
described in a system instruction and the reply is parsed.

Data flow::

    bind_tools(tools, tool_choice)
      -> convert_to_openai_tool for each tool; normalise_tool_choice -> "auto" | "any" |
         "none" | a tool name
    one call with tools bound (and tool_choice != "none")
      -> ToolMode(tools, choice).instruction(): `TOOL_INSTRUCTION` (one JSON schema a line,
         and what the choice asks for), merged into the conversation's system turn
      -> the engine's reply, held back while streaming
      -> ToolMode.parse(reply) = parse_tool_calls: content, `tool_calls`, and
         `invalid_tool_calls` (malformed JSON, unknown tool; never an exception)
      -> ToolMode.chunks: the calls as `tool_call_chunks` of the one AIMessageChunk
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk

__all__ = ["TOOL_INSTRUCTION", "ToolMode", "normalise_tool_choice", "parse_tool_calls"]

TOOL_INSTRUCTION = (
    "Tools (JSON schemas):\n{tools}\n\n"
    'To call a tool, reply with only a JSON object {{"name": "<tool name>", '
    '"arguments": {{...}}}} and nothing else. {choice}'
)
"""The system instruction that describes bound tools (`{tools}`: one JSON object per line,
`{"name", "description", "parameters"}`; `{choice}`: what `tool_choice` asks for). It is
appended to the conversation's first system message, or is the first message if there is
none."""

_CHOICE_TEXT = {
    "auto": "If no tool is needed, answer the user directly in plain text.",
    "any": "You must call one of the tools.",
}

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def normalise_tool_choice(choice: Any, names: list[str]) -> str:
    """`tool_choice` as "auto", "any", "none" or a tool name.

    `None`, `"auto"` and `False` are "auto"; `"any"`, `"required"` and `True` are "any" (with
    one tool bound, `True` names it); a dict `{"type": "function", "function": {"name": ...}}`
    or `{"name": ...}` is that name.

    Raises:
        ValueError: a choice naming no bound tool, or of another type.
    """
    if choice is None or choice == "auto" or choice is False:
        return "auto"
    if choice in ("any", "required") or choice is True:
        return names[0] if (choice is True and len(names) == 1) else "any"
    if choice == "none":
        return "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name is None:
            raise ValueError(f"tool_choice {choice!r} names no tool")
        choice = name
    if isinstance(choice, str):
        if choice not in names:
            raise ValueError(f"tool_choice {choice!r} is not one of the bound tools {names}")
        return choice
    raise ValueError(f"tool_choice must be a str, dict, bool or None, got {choice!r}")


class ToolMode:
    """The tools bound to one call (OpenAI tool dicts) and what `tool_choice` asks for."""

    def __init__(self, tools: Sequence[dict[str, Any]], choice: str | None) -> None:
        self.tools = [t.get("function", t) for t in tools]
        self.names = [t["name"] for t in self.tools]
        self.choice = choice or "auto"
        self.forced = self.choice != "auto"

    def instruction(self) -> str:
        """The system instruction describing the tools (`TOOL_INSTRUCTION`)."""
        lines = [
            json.dumps(
                {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t.get("parameters", {}),
                }
            )
            for t in self.tools
        ]
        choice = _CHOICE_TEXT.get(self.choice) or f"You must call the tool {self.choice}."
        return TOOL_INSTRUCTION.format(tools="\n".join(lines), choice=choice)

    def parse(self, reply: str) -> tuple[str, list[ToolCallChunk], list[InvalidToolCall]]:
        """A whole reply as (content, tool call chunks, invalid tool calls)."""
        content, calls, invalid = parse_tool_calls(reply, self.names, self.forced)
        chunks = [
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            for i, c in enumerate(calls)
        ]
        return content, chunks, invalid


def parse_tool_calls(
    text: str, names: Sequence[str], forced: bool = False
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Parse a reply into (content, tool_calls, invalid_tool_calls); never raises.

    A reply is a tool call when it is (optionally in a ``` fence) a JSON object, or, when
    `forced`, when it contains one anywhere. `{"name": ..., "arguments": {...}}` is the
    asked-for form (`"args"`/`"parameters"` are accepted for `"arguments"`, and a JSON
    string of arguments is decoded). An object without `"name"` is taken as the arguments
    when exactly one tool is bound. Malformed JSON, an unknown tool name or arguments that
    are not an object give an invalid tool call with the reason in `error`. Text before
    the object stays in `content`.
    """
    stripped = _FENCE.sub("", text.strip()).strip()
    start = 0 if stripped.startswith("{") else (stripped.find("{") if forced else -1)
    if start < 0:
        return text, [], []
    prefix, body = stripped[:start].strip(), stripped[start:]
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as exc:
        error = f"The reply is not valid JSON: {exc}"
        return prefix, [], [invalid_tool_call(args=body, id=call_id, error=error)]
    if not isinstance(obj, dict):
        return text, [], []
    if "name" not in obj and len(names) == 1:
        obj = {"name": names[0], "arguments": obj}
    name, args = obj.get("name"), _arguments(obj)
    if not isinstance(name, str) or name not in names:
        error = f"{name!r} is not one of the tools {list(names)}"
    elif not isinstance(args, dict):
        error = f"the arguments must be a JSON object, got {args!r}"
    else:
        return prefix, [tool_call(name=name, args=args, id=call_id)], []
    name = name if isinstance(name, str) else None
    return prefix, [], [invalid_tool_call(name=name, args=json.dumps(obj), id=call_id, error=error)]


def _arguments(obj: dict[str, Any]) -> Any:
    """A call object's arguments (`arguments`, `args` or `parameters`; a JSON string decoded)."""
    args = obj.get("arguments", obj.get("args", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args
