"""`ChatDeepEn`: a deepen ensemble as a LangChain chat model (messages in, an `AIMessage`
out, with tool calling and structured output).

Data flow of one call::

    LangChain messages (+ tools and tool_choice bound with `bind_tools`)
      -> settings (`DeepEnBase._call`): the fields, overridden per call
         (`invoke(x, max_tokens=8, eta=0)`), stop strings merged (field first); the main
         member, when `main` is None, is `Ensemble.default_chat_main()`
      -> `_messages.to_engine_messages`: a chat conversation ({"role", "content"} dicts)
         that each member renders with its own chat template; with tools bound,
         `tools.ToolMode` adds the tool instruction (`TOOL_INSTRUCTION`) as a system turn
      -> `Ensemble.stream` / `astream`: text deltas, then a final event with usage
      -> `_ChunkBuilder`: an AIMessageChunk per delta and a last one with usage_metadata
         and response_metadata (with tools bound: the text is held back and the last chunk
         carries the parsed reply, `tool_calls` or `invalid_tool_calls`)
      -> `_stream` yields the chunks (callbacks get every one); `_generate` merges the
         same chunks into one AIMessage, so streamed and non-streamed replies are equal
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    InvalidToolCall,
    ToolCallChunk,
    UsageMetadata,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from deepen_engine import Ensemble, GenerationConfig, StreamEvent

from .._settings import engine_astream, engine_stream
from ._base import LANGCHAIN_CONFIG, PROVIDER, DeepEnBase, token_counts, usage_dict
from ._messages import to_engine_messages, with_system
from .tools import ToolMode, normalise_tool_choice

__all__ = ["ChatDeepEn"]

_Prepared = tuple[Ensemble, GenerationConfig, list[dict[str, str]], ToolMode | None]


class ChatDeepEn(DeepEnBase, BaseChatModel):
    """A deepen ensemble as a LangChain chat model.

    Messages go to the engine as a chat conversation that each member renders with its own
    chat template: system -> "system", human -> "user", AI -> "assistant" (its tool calls
    written as the JSON objects the model is asked to emit), tool results -> "user"
    (`Tool <name> returned: <content>`). Only the text of message content is used.

    Main member: `main=None` is the engine's rule, `Ensemble.default_chat_main()`: the first
    member with a chat template of its own (its tokenizer's, or `MemberSpec.chat_template`),
    else the ensemble's main. With the default members that is SmolLM2-135M-Instruct
    (index 1): Gemma-3-270m is a base model (its GGUF has no template). Set `main` to choose
    another. Every setting can be overridden per call, fusion settings included.

    Tools (`bind_tools`): the tools are described in a system instruction
    (`TOOL_INSTRUCTION`) asking for a reply `{"name": ..., "arguments": {...}}`; the reply is
    parsed by `parse_tool_calls` into `AIMessage.tool_calls` (malformed JSON gives
    `invalid_tool_calls`, never an exception). `with_structured_output` works through it, and
    so do agents (`langchain.agents.create_agent`). While tools are bound, `stream` holds
    the text back and yields it (or the tool calls) at the end.

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
        """Bind tools: they are described to the members in a system instruction.

        Args:
            tools: LangChain tools, functions, pydantic models, or OpenAI tool dicts.
            tool_choice: `None`/`"auto"` (the model may answer in text), `"any"`,
                `"required"` or `True` (it must call a tool), a tool name or
                `{"type": "function", "function": {"name": ...}}` (it must call that
                tool), or `"none"` (tools are not described).
            kwargs: other settings bound to the calls.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = normalise_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    # --- generation -----------------------------------------------------------------------

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Prepared:
        """(engine view, generation config, conversation, tool mode) of one call."""
        call, _ = self._call(stop, kwargs)
        return (call.view, call.config, *_conversation(messages, kwargs))

    async def _aprepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Prepared:
        """`_prepare` for asyncio: a first load runs in a worker thread."""
        call, _ = await self._acall(stop, kwargs)
        return (call.view, call.config, *_conversation(messages, kwargs))

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
        view, config, conversation, mode = self._prepare(messages, stop, kwargs)
        builder = _ChunkBuilder(view.main.name, self.model_name, mode)
        events = engine_stream(view, conversation, config)
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
        view, config, conversation, mode = await self._aprepare(messages, stop, kwargs)
        builder = _ChunkBuilder(view.main.name, self.model_name, mode)
        events = engine_astream(view, conversation, config)
        async with aclosing(events):
            async for event in events:
                for chunk in builder.add(event):
                    if chunk.text and run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk


def _conversation(
    messages: list[BaseMessage], kwargs: Mapping[str, Any]
) -> tuple[list[dict[str, str]], ToolMode | None]:
    """The engine conversation and the tool mode (None without tools or with "none")."""
    conversation = to_engine_messages(messages)
    tools = kwargs.get("tools") or []
    choice = kwargs.get("tool_choice")
    if not tools or choice == "none":
        return conversation, None
    mode = ToolMode(tools, choice)
    return with_system(conversation, mode.instruction()), mode


def _chat_result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    """The chunks of one reply merged into a ChatResult with one AIMessage."""
    if not chunks:
        raise RuntimeError("the engine stream ended without a final event")
    merged = chunks[0]  # with tools bound, the only chunk: its invalid_tool_calls stand
    for chunk in chunks[1:]:
        merged = merged + chunk
    msg = merged.message
    assert isinstance(msg, AIMessageChunk)
    message = AIMessage(
        content=msg.content,
        tool_calls=msg.tool_calls,
        invalid_tool_calls=msg.invalid_tool_calls,
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
    """Turns engine events into ChatGenerationChunks (holding text back while tools are
    bound, to parse it at the end).
    """

    def __init__(self, main_name: str, model_name: str, mode: ToolMode | None) -> None:
        self.main_name, self.model_name, self.mode = main_name, model_name, mode
        self.held: list[str] = []

    def add(self, event: StreamEvent) -> list[ChatGenerationChunk]:
        """The chunks for one event."""
        if self.mode is not None:
            self.held.append(event.delta)
            if event.finish_reason is None:
                return []
            content, calls, invalid = self.mode.parse("".join(self.held))
            return [self._last(event, content, calls, invalid)]
        text = [ChatGenerationChunk(message=AIMessageChunk(content=event.delta))]
        if event.finish_reason is None:
            return text
        return [*(text if event.delta else []), self._last(event, "", [], [])]

    def _last(
        self,
        event: StreamEvent,
        content: str,
        calls: list[ToolCallChunk],
        invalid: list[InvalidToolCall],
    ) -> ChatGenerationChunk:
        """The last chunk: usage, finish reason, and with tools bound the whole reply."""
        counts = token_counts(event.usage, self.main_name)
        last = AIMessageChunk(
            content=content,
            tool_call_chunks=calls,
            usage_metadata=_usage_metadata(counts),
            response_metadata={
                "model_name": self.model_name,
                "model_provider": PROVIDER,
                "finish_reason": event.finish_reason,
                "usage": usage_dict(event.usage),
            },
            chunk_position="last",
        )
        if invalid:
            # Set after construction, as the parser decided (the chunk validator would
            # re-parse them from tool_call_chunks); with tools bound this is the only chunk.
            last.invalid_tool_calls = list(invalid)
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
