"""What both adapters call on the engine for one request: its streams, typed as the
closable generators they are, and the usage counts in OpenAI's words.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import Any

from deepen_engine import Ensemble, GenerationConfig, StreamEvent, Usage


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
