"""What both adapters call on the engine for one request: its streams, typed as the
closable generators they are, and the usage counts in OpenAI's words.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import Any

from deepen_engine import Ensemble, GenerationConfig, OutputCutError, StreamEvent, Usage


def token_counts(usage: Usage | None, main_name: str) -> dict[str, int]:
    """OpenAI-style counts (`prompt_tokens` in the main member's tokens); zeros without usage."""
    return (usage or Usage()).token_counts(main_name)


def engine_stream(
    view: Ensemble,
    prompt: Any,
    config: GenerationConfig,
    batch_size: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> Generator[StreamEvent, None, None]:
    """`view.stream(...)`, typed as the closable generator it is."""
    return view.stream(prompt, config, batch_size=batch_size, tools=tools, tool_choice=tool_choice)


def engine_astream(
    view: Ensemble,
    prompt: Any,
    config: GenerationConfig,
    batch_size: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> AsyncGenerator[StreamEvent, None]:
    """`view.astream(...)`, typed as the closable async generator it is."""
    return view.astream(prompt, config, batch_size=batch_size, tools=tools, tool_choice=tool_choice)


def check_structure_complete(
    finish_reason: str | None, text: str, has_call: bool, tokens: int, setting: str
) -> None:
    """`OutputCutError` when a structured reply stopped at the token limit before its JSON
    closed; a reply that closed exactly at the limit passes.

    Args:
        finish_reason: the row's finish reason ("length" is the one that can cut).
        text: the reply's text (the JSON for structured output; empty for a tool call).
        has_call: whether the reply holds a whole tool call.
        tokens: the tokens the reply took, for the message.
        setting: the adapter's name of the limit (`max_tokens`, `max_new_tokens`).
    """
    if finish_reason != "length" or has_call:
        return
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    shown = text if len(text) <= 60 else text[:60] + "..."
    raise OutputCutError(
        f"The structured reply reached the token limit ({tokens} tokens) before its JSON "
        f"closed (finish_reason 'length'): {shown!r}. Raise {setting} (e.g. "
        f"{setting}={max(2 * tokens, 64)}) so the object can be completed."
    )
