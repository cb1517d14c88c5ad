"""`structured_predict` on the engine's JSON-schema constraint (used by LlamaIndex's
`as_structured_llm`, query engines with `output_cls`, ...).

Data flow::

    structured_predict(Output, prompt, **prompt_args)
      -> the prompt's messages, after a system message asking for JSON of the schema
         (`STRUCTURED_INSTRUCTION`)
      -> chat(messages, json_schema=Output.model_json_schema(), closed: no other
         properties): the reply is JSON valid against the schema (docs/constraints.md)
      -> OutputCutError if max_new_tokens cut the JSON, else Output.model_validate_json(reply)
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.prompts import BasePromptTemplate
from llama_index_instrumentation import get_dispatcher
from pydantic import BaseModel

from deepen_engine.decoding.tools import closed

from .._engine_calls import check_structure_complete

__all__ = ["STRUCTURED_INSTRUCTION", "StructuredPredict"]

STRUCTURED_INSTRUCTION = "Answer with a JSON object valid against this JSON schema:\n{schema}"
"""The system message added before the prompt's messages (`{schema}`: the output class's
JSON schema)."""

_M = TypeVar("_M", bound=BaseModel)
dispatcher = get_dispatcher(__name__)


class StructuredPredict:
    """`structured_predict` and `astructured_predict` through a JSON-schema constraint
    (a mixin of `DeepEnLLM`, before LlamaIndex's `LLM` in its bases).
    """

    def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:  # noqa: D102
        raise NotImplementedError  # DeepEnLLM's

    async def achat(self, messages: Any, **kwargs: Any) -> ChatResponse:  # noqa: D102
        raise NotImplementedError  # DeepEnLLM's

    def structured_predict(
        self,
        output_cls: type[_M],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> _M:
        """An `output_cls` instance for the prompt: the reply is constrained to its JSON
        schema, so it parses; `OutputCutError` (saying to raise `max_new_tokens`) when
        `max_new_tokens` cuts it, never half an object.
        """
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        messages, schema = _request(output_cls, prompt, prompt_args)
        response = self.chat(messages, json_schema=schema, **(llm_kwargs or {}))
        _check_complete(response)
        result = output_cls.model_validate_json(response.message.content or "")
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    async def astructured_predict(
        self,
        output_cls: type[_M],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> _M:
        """`structured_predict` for asyncio."""
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        messages, schema = _request(output_cls, prompt, prompt_args)
        response = await self.achat(messages, json_schema=schema, **(llm_kwargs or {}))
        _check_complete(response)
        result = output_cls.model_validate_json(response.message.content or "")
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result


def _request(
    output_cls: type[BaseModel], prompt: BasePromptTemplate, prompt_args: dict[str, Any]
) -> tuple[list[ChatMessage], dict[str, Any]]:
    """The chat messages (instruction first) and the JSON schema of one prediction."""
    schema = closed(output_cls.model_json_schema())  # the class's fields and no others
    instruction = STRUCTURED_INSTRUCTION.format(schema=json.dumps(schema))
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content=instruction),
        *prompt.format_messages(**prompt_args),
    ]
    return messages, schema


def _check_complete(response: ChatResponse) -> None:
    """`OutputCutError` when `max_new_tokens` cut the reply's JSON."""
    raw = response.raw if isinstance(response.raw, dict) else {}
    check_structure_complete(
        raw.get("finish_reason"),
        response.message.content or "",
        False,
        int(raw.get("usage", {}).get("completion_tokens", 0)),
        "max_new_tokens",
    )
