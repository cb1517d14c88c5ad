"""LlamaIndex messages <-> the engine: the conversation in, responses (with tool calls) out.

Data flow::

    [ChatMessage, ...]  (an assistant's calls as ToolCallBlocks or
                         additional_kwargs["tool_calls"]; tool results with role "tool" and
                         additional_kwargs["tool_call_id"])
      -> to_engine_messages: OpenAI-style dicts {"role", "content", "tool_calls",
         "tool_call_id", "name"} that each member renders with its own template
    engine result / final StreamEvent (text, finish_reason, usage, tool_calls)
      -> response_message: an assistant ChatMessage, its text as a TextBlock and each call
         as a ToolCallBlock (and in additional_kwargs["tool_calls"], OpenAI-style)
      -> tool_selections: the calls as LlamaIndex ToolSelections (agents run them)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ContentBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection

from deepen_engine import ConfigError, ToolCall

__all__ = ["response_message", "to_engine_messages", "tool_selections"]

# LlamaIndex roles -> the engine's roles.
_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the engine's conversation (OpenAI-style dicts).

    Only text content is kept (other blocks, e.g. images, are dropped). An assistant's tool
    calls (ToolCallBlocks, else `additional_kwargs["tool_calls"]`) become `"tool_calls"`; a
    `tool` message keeps `tool_call_id` and `name` from its `additional_kwargs`.
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = _ROLES.get(MessageRole(message.role))
        if role is None:
            raise ConfigError(f"messages[{i}] has role {message.role!r}, which deepen cannot map.")
        item: dict[str, Any] = {"role": role, "content": message.content or ""}
        if role == "assistant":
            calls = _calls(message)
            if calls:
                item["tool_calls"] = calls
        elif role == "tool":
            extra = message.additional_kwargs
            item["tool_call_id"] = extra.get("tool_call_id")
            item["name"] = extra.get("name")
        out.append(item)
    return out


def _calls(message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's tool calls as OpenAI-style dicts."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return [
            {
                "id": b.tool_call_id or f"call_{j}",
                "type": "function",
                "function": {"name": b.tool_name, "arguments": b.tool_kwargs or {}},
            }
            for j, b in enumerate(blocks)
        ]
    calls = message.additional_kwargs.get("tool_calls") or []
    return [c if isinstance(c, dict) else c.model_dump() for c in calls]


def response_message(text: str, calls: Sequence[ToolCall]) -> ChatMessage:
    """The assistant's reply: its text, and each tool call as a ToolCallBlock (also in
    `additional_kwargs["tool_calls"]`, as OpenAI-style clients read them).
    """
    if not calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    blocks: list[ContentBlock] = [TextBlock(text=text)] if text else []
    blocks += [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments))
        for c in calls
    ]
    openai = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
        }
        for c in calls
    ]
    return ChatMessage(
        role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs={"tool_calls": openai}
    )


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    """The reply's tool calls as ToolSelections."""
    return [
        ToolSelection(
            tool_id=b.tool_call_id or "",
            tool_name=b.tool_name,
            tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {},
        )
        for b in message.blocks
        if isinstance(b, ToolCallBlock)
    ]
