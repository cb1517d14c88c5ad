"""LangChain messages -> the engine's chat conversation.

Data flow::

    [SystemMessage, HumanMessage, AIMessage (maybe with tool_calls), ToolMessage, ...]
      -> to_engine_messages: OpenAI-style dicts, {"role": "system" | "user" | "assistant"
         | "tool", "content": str}; an AI message's tool calls as "tool_calls", a tool
         result with its "tool_call_id" and the tool's "name"
      -> Ensemble.stream, where each member renders the conversation with its own template
         (tool calls and results through the template, or as text: decoding/chat.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

__all__ = ["to_engine_messages"]

# ChatMessage roles -> the engine's roles (anything else is a user turn).
_CHAT_ROLES = {
    "system": "system",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
}


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the engine's chat conversation (OpenAI-style dicts).

    Only the text of message content is kept. An AI message's tool calls become
    `"tool_calls"` (`{"id", "type": "function", "function": {"name", "arguments"}}`); a
    tool result is a `"tool"` message with its call's id and the tool's name.

    Raises:
        ValueError: a message of a kind the engine cannot take (e.g. a RemoveMessage).
    """
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool call id -> tool name, for the results
    for i, message in enumerate(messages):
        text = message.text if isinstance(message.text, str) else str(message.text)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            out.append(_ai_message(message, text, call_names))
        elif isinstance(message, (ToolMessage, FunctionMessage)):
            call_id = getattr(message, "tool_call_id", "") or ""
            name = message.name or call_names.get(call_id) or "tool"
            out.append({"role": "tool", "content": text, "tool_call_id": call_id, "name": name})
        elif isinstance(message, ChatMessage):
            out.append({"role": _CHAT_ROLES.get(message.role, "user"), "content": text})
        else:
            raise ValueError(
                f"messages[{i}] is a {type(message).__name__}, which ChatDeepEn cannot send; "
                "use system, human, AI, tool or chat messages."
            )
    return out


def _ai_message(message: AIMessage, text: str, call_names: dict[str, str]) -> dict[str, Any]:
    """An AI turn with its tool calls (recorded in call_names for the results)."""
    out: dict[str, Any] = {"role": "assistant", "content": text}
    calls = []
    for j, call in enumerate(message.tool_calls):
        call_id = call.get("id") or f"call_{j}"
        call_names[call_id] = call["name"]
        function = {"name": call["name"], "arguments": call["args"]}
        calls.append({"id": call_id, "type": "function", "function": function})
    if calls:
        out["tool_calls"] = calls
    return out
