"""LangChain messages -> the engine's chat conversation.

Data flow::

    [SystemMessage, HumanMessage, AIMessage (maybe with tool_calls), ToolMessage, ...]
      -> to_engine_messages: [{"role": "system" | "user" | "assistant", "content": str}]
         (AI tool calls written as the JSON objects `TOOL_INSTRUCTION` asks for; tool
         results as user turns "Tool <name> returned: <content>")
      -> with_system: the tool instruction merged into the first system turn
      -> Ensemble.stream, where each member renders the conversation with its own template
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

__all__ = ["to_engine_messages", "with_system"]

# ChatMessage roles -> the engine's roles (anything else is a user turn).
_CHAT_ROLES = {
    "system": "system",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
}


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's chat conversation ({"role", "content"} dicts).

    Only the text of message content is kept. AI tool calls are written as the JSON objects
    `TOOL_INSTRUCTION` asks for; tool results become user turns `Tool <name> returned:
    <content>`.

    Raises:
        ValueError: a message of a kind the engine cannot take (e.g. a RemoveMessage).
    """
    out: list[dict[str, str]] = []
    call_names: dict[str, str] = {}  # tool call id -> tool name, for the results
    for i, message in enumerate(messages):
        text = message.text if isinstance(message.text, str) else str(message.text)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            out.append({"role": "assistant", "content": _ai_content(message, text, call_names)})
        elif isinstance(message, (ToolMessage, FunctionMessage)):
            call_id = getattr(message, "tool_call_id", "")
            name = message.name or call_names.get(call_id) or "tool"
            out.append({"role": "user", "content": f"Tool {name} returned: {text}"})
        elif isinstance(message, ChatMessage):
            out.append({"role": _CHAT_ROLES.get(message.role, "user"), "content": text})
        else:
            raise ValueError(
                f"messages[{i}] is a {type(message).__name__}, which ChatDeepEn cannot send; "
                "use system, human, AI, tool or chat messages."
            )
    return out


def _ai_content(message: AIMessage, text: str, call_names: dict[str, str]) -> str:
    """An AI turn: its text, then one JSON object per tool call (recorded in call_names)."""
    calls = []
    for call in message.tool_calls:
        call_names[call.get("id") or ""] = call["name"]
        calls.append(json.dumps({"name": call["name"], "arguments": call["args"]}))
    return "\n".join([text, *calls]) if text else "\n".join(calls)


def with_system(conversation: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """The conversation with `instruction` appended to its first system turn (or as one)."""
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]["content"]
        merged = f"{first}\n\n{instruction}" if first else instruction
        return [{"role": "system", "content": merged}, *conversation[1:]]
    return [{"role": "system", "content": instruction}, *conversation]
