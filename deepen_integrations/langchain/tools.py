"""Tool calling and structured output for `ChatDeepEn`, on the engine's constraints.

Data flow::

    bind_tools(tools, tool_choice)
      -> convert_to_openai_tool for each tool; engine_tool_choice: LangChain's values
         ("auto", "any", "required", "none", a name, True, a dict) as the engine's
         ("auto", "required", "none", a name)
    one call -> Ensemble.stream(conversation, tools=..., tool_choice=...): the engine
         describes the tools to each member (its template, or a system instruction),
         constrains the main member so a call always parses, and parses it
      -> the final event's `tool_calls` -> `call_chunks`: `tool_call_chunks` with an index

    with_structured_output(schema, method)
      "json_schema" (default): the call is bound to GenerationConfig.json_schema = the
          schema (closed: no other properties); the reply is JSON valid against it, parsed
          by `structured_parser`
      "function_calling": the schema as a tool, forced (tool_choice = its name); the
          call's arguments are parsed
      "json_mode": GenerationConfig.json_schema = {"type": "object"} (any JSON object)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolCallChunk
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass

from deepen_engine import ToolCall
from deepen_engine.decoding.tools import closed

from .._engine_calls import check_structure_complete

__all__ = [
    "STRUCTURED_METHODS",
    "call_chunks",
    "complete_reply",
    "engine_tool_choice",
    "structured_parser",
    "structured_schema",
]

STRUCTURED_METHODS = ("json_schema", "function_calling", "json_mode")


def engine_tool_choice(choice: Any, names: list[str]) -> str:
    """LangChain's `tool_choice` as the engine's: "auto", "required", "none" or a name.

    `None`, `"auto"` and `False` are "auto"; `"any"`, `"required"` and `True` are
    "required" (with one tool bound, `True` names it); a dict
    `{"type": "function", "function": {"name": ...}}` or `{"name": ...}` is that name.

    Raises:
        ValueError: a choice naming no bound tool, or of another type.
    """
    if choice is None or choice == "auto" or choice is False:
        return "auto"
    if choice in ("any", "required") or choice is True:
        return names[0] if (choice is True and len(names) == 1) else "required"
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


def call_chunks(calls: Sequence[ToolCall]) -> list[ToolCallChunk]:
    """The engine's parsed calls as LangChain `tool_call_chunks` (arguments as JSON, with an
    index, as LangChain merges streamed calls by index).
    """
    return [
        tool_call_chunk(name=c.name, args=json.dumps(c.arguments), id=c.id, index=i)
        for i, c in enumerate(calls)
    ]


def structured_schema(schema: Any, method: str) -> dict[str, Any]:
    """The JSON schema the reply is constrained to for `method` ("json_schema",
    "json_mode"); ValueError for an unknown method or a missing schema. Objects that list
    their properties get `additionalProperties: false` (as tool arguments do): the reply
    holds the schema's fields and no others.
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"method must be one of {list(STRUCTURED_METHODS)}, got {method!r}")
    if method == "json_mode":
        return {"type": "object"}
    if schema is None:
        raise ValueError(f"with_structured_output(method={method!r}) needs a schema")
    return dict(closed(convert_to_json_schema(schema)))


def structured_parser(schema: Any, method: str, tool_name: str | None) -> OutputParserLike[Any]:
    """The parser of a structured reply: a pydantic class gives its instances, any other
    schema a dict; with "function_calling" the forced call's arguments are parsed.
    """
    is_model = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic 2 or 1
    if method == "function_calling":
        if is_model:
            return PydanticToolsParser(tools=[schema], first_tool_only=True)
        return JsonOutputKeyToolsParser(key_name=str(tool_name), first_tool_only=True)
    if is_model:
        return PydanticOutputParser(pydantic_object=schema)
    return JsonOutputParser()


def complete_reply(message: AIMessage) -> AIMessage:
    """The reply, checked before a structured parser reads it: `OutputCutError` (saying to
    raise `max_tokens`) when `max_tokens` cut its JSON, never half an object.
    """
    tokens = message.usage_metadata["output_tokens"] if message.usage_metadata else 0
    check_structure_complete(
        message.response_metadata.get("finish_reason"),
        message.content if isinstance(message.content, str) else "",
        bool(message.tool_calls),
        tokens,
        "max_tokens",
    )
    return message
