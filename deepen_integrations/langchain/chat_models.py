"""`ChatDeepEn`: a deepen ensemble as a LangChain chat model (messages in, an `AIMessage`
out, with tool calling and structured output).

Data flow of one call::

    LangChain messages (+ tools and tool_choice bound with `bind_tools`, or an output
    constraint bound by `with_structured_output`)
      -> settings (`DeepEnBase._call`): the fields, overridden per call
         (`invoke(x, max_tokens=8, eta=0)`), stop strings merged (field first), a bound
         `json_schema`; the main member, when `main` is None, is the ensemble's
         (`"auto"` by default), or `Ensemble.default_chat_main()` for an indexed one
      -> `_messages.to_engine_messages`: a chat conversation (OpenAI-style dicts, tool
         calls and results included) that each member renders with its own chat template
      -> `Ensemble.stream` / `astream` (with `tools` and `tool_choice`: the engine describes
         the tools, constrains the reply so a call always parses, and parses it): text
         deltas, then a final event with usage (and `tool_calls`)
      -> `_ChunkBuilder`: an AIMessageChunk per delta and a last one with usage_metadata,
         response_metadata and the calls as `tool_call_chunks` (with an index)
      -> `_stream` yields the chunks (callbacks get every one); `_generate` merges the
         same chunks into one AIMessage, so streamed and non-streamed replies are equal
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from operator import itemgetter
from typing import Any, Literal, NamedTuple

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from deepen_engine import Ensemble, GenerationConfig, StreamEvent

from .._engine_calls import engine_astream, engine_stream
from ._base import LANGCHAIN_CONFIG, PROVIDER, DeepEnBase, token_counts, usage_dict
from ._messages import to_engine_messages
from .tools import (
    call_chunks,
    complete_reply,
    engine_tool_choice,
    structured_parser,
    structured_schema,
)

__all__ = ["ChatDeepEn"]


class _Prepared(NamedTuple):
    """One call's engine view, generation config, conversation and tools."""

    view: Ensemble
    config: GenerationConfig
    conversation: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str | None


class ChatDeepEn(DeepEnBase, BaseChatModel):
    """A deepen ensemble as a LangChain chat model.

    Messages go to the engine as a chat conversation that each member renders with its own
    chat template: system -> "system", human -> "user", AI -> "assistant" (with its tool
    calls), tool results -> "tool" (templates without tools see them as text: see
    deepen_engine/decoding/chat.py). Only the text of message content is used.

    Main member: `main=None` is the ensemble's, by default `"auto"`: each request is led by
    the member with a chat template of its own (its tokenizer's, or
    `MemberSpec.chat_template`) that reads it best. With the default members that is
    SmolLM2-135M-Instruct: Gemma-3-270m is a base model (its GGUF has no template). With an
    ensemble whose main is an index, `Ensemble.default_chat_main()` leads (the first member
    with a chat template). Set `main` to choose another. Every setting can be overridden
    per call, fusion settings included.

    Tools (`bind_tools`): the engine describes the tools to each member (through its chat
    template where it takes tools, else a system instruction) and constrains the main
    member's decoding, so a call always parses and its arguments match the tool's schema
    (docs/constraints.md); calls arrive as `AIMessage.tool_calls` (streamed: one
    `tool_call_chunks` entry per call, with an index). `with_structured_output`
    (`json_schema` by default, `function_calling`, `json_mode`) constrains the reply to the
    schema, so the result always parses. Agents (`langchain.agents.create_agent`) work on it.

    Example:
        ```python
        from deepen_integrations.langchain import ChatDeepEn

        chat = ChatDeepEn(max_tokens=64)
        chat.invoke([("system", "Be brief."), ("human", "Name a colour.")]).content
        ```
    """

    model_config = LANGCHAIN_CONFIG

    chat_adapter = True

    streaming: bool = False
    """Use the streaming path in `invoke` as well (the text is the same either way)."""

    @property
    def _llm_type(self) -> str:
        """The LangChain type name."""
        return "deepen-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that changes the output."""
        params = self._settings_params()
        if params["main"] is None:
            params["main"] = "first member with a chat template"
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith tracing parameters (provider, model name, temperature, ...)."""
        return self._ls_params(super()._get_ls_params(stop=stop, **kwargs), stop, kwargs)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: the engine describes them to the members and constrains calls.

        Args:
            tools: LangChain tools, functions, pydantic models, or OpenAI tool dicts.
            tool_choice: `None`/`"auto"` (the model may answer in text or call a tool),
                `"any"`, `"required"` or `True` (it must call a tool), a tool name or
                `{"type": "function", "function": {"name": ...}}` (it must call that
                tool), or `"none"` (tools are not described).
            kwargs: other settings bound to the calls.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = engine_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose output is `schema`'s: the reply is constrained, so it parses.

        Args:
            schema: a pydantic class (results are its instances), a TypedDict, a JSON
                schema or an OpenAI function spec (results are dicts).
            method: `"json_schema"` (default: the reply is JSON valid against the schema),
                `"function_calling"` (the schema is a tool the reply must call; its
                arguments are the result) or `"json_mode"` (any JSON object; the schema
                only parses it).
            include_raw: return `{"raw", "parsed", "parsing_error"}` instead.
            strict: accepted for compatibility; output is always strict.
            kwargs: none are accepted.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {kwargs}")
        trace = {"kwargs": {"method": method}, "schema": schema}
        tool_name = None
        if method == "function_calling":
            if schema is None:
                raise ValueError("with_structured_output(method='function_calling') needs a schema")
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=tool_name, ls_structured_output_format=trace
            )
        else:
            llm = self.bind(
                json_schema=structured_schema(schema, method), ls_structured_output_format=trace
            )
        # A reply cut by max_tokens raises OutputCutError here, before the parser.
        parser = RunnableLambda(complete_reply) | structured_parser(schema, method, tool_name)
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # --- generation -----------------------------------------------------------------------

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Prepared:
        """The engine view, generation config, conversation and tools of one call."""
        call, _ = self._call(stop, kwargs)
        return _prepared(call.view, call.config, messages, kwargs)

    async def _aprepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Prepared:
        """`_prepare` for asyncio: a first load runs in a worker thread."""
        call, _ = await self._acall(stop, kwargs)
        return _prepared(call.view, call.config, messages, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Aggregate `_stream`'s chunks into one message."""
        chunks = list(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        return _chat_result(chunks)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """`_generate` for asyncio: aggregates `_astream`."""
        chunks = [
            c async for c in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs)
        ]
        return _chat_result(chunks)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """A chunk per text delta, then a last one with usage_metadata and metadata."""
        call = self._prepare(messages, stop, kwargs)
        builder = _ChunkBuilder(call.view.main.name, self.model_name)
        events = engine_stream(
            call.view, call.conversation, call.config, None, call.tools, call.tool_choice
        )
        with closing(events):  # closing this stream early frees the engine's caches
            for event in events:
                for chunk in builder.add(event):
                    if chunk.text and run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """`_stream` for asyncio: the event loop stays free while the engine decodes."""
        call = await self._aprepare(messages, stop, kwargs)
        builder = _ChunkBuilder(call.view.main.name, self.model_name)
        events = engine_astream(
            call.view, call.conversation, call.config, None, call.tools, call.tool_choice
        )
        async with aclosing(events):
            async for event in events:
                for chunk in builder.add(event):
                    if chunk.text and run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk


def _prepared(
    view: Ensemble, config: GenerationConfig, messages: list[BaseMessage], kwargs: Mapping[str, Any]
) -> _Prepared:
    """A call's engine inputs; tools only when bound (and tool_choice is not "none")."""
    conversation = to_engine_messages(messages)
    tools = kwargs.get("tools") or None
    choice = kwargs.get("tool_choice")
    if not tools or choice == "none":
        return _Prepared(view, config, conversation, None, None)
    return _Prepared(view, config, conversation, list(tools), choice)


def _chat_result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    """The chunks of one reply merged into a ChatResult with one AIMessage."""
    if not chunks:
        raise RuntimeError("the engine stream ended without a final event")
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    msg = merged.message
    assert isinstance(msg, AIMessageChunk)
    message = AIMessage(
        content=msg.content,
        tool_calls=msg.tool_calls,
        usage_metadata=msg.usage_metadata,
        response_metadata=msg.response_metadata,
        id=msg.id,
    )
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=merged.generation_info)],
        llm_output={
            "token_usage": dict(msg.usage_metadata or {}),
            "model_name": msg.response_metadata.get("model_name"),
        },
    )


class _ChunkBuilder:
    """Turns engine events into ChatGenerationChunks."""

    def __init__(self, main_name: str, model_name: str) -> None:
        self.main_name, self.model_name = main_name, model_name

    def add(self, event: StreamEvent) -> list[ChatGenerationChunk]:
        """The chunks for one event: its text, and after the final one the last chunk."""
        text = [ChatGenerationChunk(message=AIMessageChunk(content=event.delta))]
        if event.finish_reason is None:
            return text
        return [*(text if event.delta else []), self._last(event)]

    def _last(self, event: StreamEvent) -> ChatGenerationChunk:
        """The last chunk: usage, finish reason, and the reply's tool calls."""
        counts = token_counts(event.usage, self.main_name)
        last = AIMessageChunk(
            content="",
            tool_call_chunks=call_chunks(event.tool_calls or []),
            usage_metadata=_usage_metadata(counts),
            response_metadata={
                "model_name": self.model_name,
                "model_provider": PROVIDER,
                "finish_reason": event.finish_reason,
                "usage": usage_dict(event.usage),
            },
            chunk_position="last",
        )
        return ChatGenerationChunk(message=last)


def _usage_metadata(counts: dict[str, int]) -> UsageMetadata:
    """`Usage.token_counts` in LangChain's names."""
    # langchain_core imports NotRequired from typing (3.11+); under this project's mypy
    # python_version 3.10 its optional *_token_details keys read as required.
    return UsageMetadata(  # type: ignore[typeddict-item]
        input_tokens=counts["prompt_tokens"],
        output_tokens=counts["completion_tokens"],
        total_tokens=counts["total_tokens"],
    )
