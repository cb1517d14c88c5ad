"""LlamaIndex adapter: `DeepEnLLM`, a `FunctionCallingLLM` backed by a deepen `Ensemble`.

Data flow (one request)::

    LlamaIndex (query engine, chat engine, agent, ...)
      |  complete(prompt) / chat([ChatMessage, ...]) and their stream / async variants,
      |  with optional per-call settings (`complete(p, max_new_tokens=8, eta=0)`)
      v
    DeepEnLLM (settings shared with the LangChain adapter: `_settings.DeepEnSettings`)
      |  settings -> a `with_fusion` view of the ensemble (cached per fusion setting; main
      |      member: `main`, else the ensemble's: "auto" or `default_chat_main()`) and a
      |      GenerationConfig
      |  ChatMessage list -> [{"role", "content"}, ...]  (`_messages.to_engine_messages`:
      |      roles mapped onto system / user / assistant / tool, tool calls kept; each
      |      member renders it with its OWN chat template)
      |  tools (chat_with_tools, FunctionAgent): OpenAI function specs and tool_choice to
      |      the engine, which constrains the reply so a call always parses
      |  structured_predict: GenerationConfig.json_schema = the output class's schema
      |  first use only: Ensemble(models, **fusion settings), cached on the instance
      v
    Ensemble.stream / astream   (the scheduler batches concurrent requests together)
      |  GenerationResult / StreamEvent (text deltas; a final event with usage)
      v
    CompletionResponse / ChatResponse
         text     = the answer so far (cumulative), delta = the new piece (streams)
         message  = for chat, with each tool call as a ToolCallBlock (final response)
         raw      = {"usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
                     "finish_reason", "token_ids", "main_member"}   (final response)

`prompt_tokens` is the prompt's length in the main member's tokens (the one whose
vocabulary the answer is written in; `Usage.token_counts`), so LlamaIndex's
`TokenCountingHandler` counts the engine's own numbers. The async methods run decoding in a
worker thread (the engine's `astream`), so the event loop stays free; LlamaIndex's callback
decorators wrap every public method, so callbacks and instrumentation events fire as for
any other LLM.

Example::

    from deepen_integrations.llama_index import DeepEnLLM

    llm = DeepEnLLM(max_new_tokens=64)  # cheap: the models load on first use
    print(llm.complete("The capital of France is").text)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import aclosing, closing
from typing import TYPE_CHECKING, Any, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from deepen_engine import Ensemble, GenerationResult, StreamEvent

from .._engine_calls import engine_astream, engine_stream, token_counts
from .._settings import CallSettings, DeepEnSettings
from ._messages import response_message, to_engine_messages, tool_selections
from ._structured import StructuredPredict

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["DeepEnLLM"]

_R = TypeVar("_R", CompletionResponse, ChatResponse)


class DeepEnLLM(StructuredPredict, DeepEnSettings, FunctionCallingLLM):
    """A LlamaIndex LLM generating with a deepen token-level ensemble of local models.

    Settings: those of every deepen adapter (`models` or `ensemble=`, `main`, the fusion
    settings, `max_new_tokens` (alias `max_tokens`, default 128), `min_new_tokens`,
    `temperature`, `top_p`, `top_k`, `seed`, `truncation`, `stop`, `fusion_kwargs`; see
    `deepen_integrations._settings.DeepEnSettings`), plus `context_window`. Construction is
    cheap and validates every setting with the engine's own config models (a bad one raises
    `ValueError` naming the field) without loading anything; the models load on first use
    (a call, or reading `metadata` when `context_window` is not given) and are cached on the
    instance. Pass `ensemble=` to share one ready `Ensemble` between several LLMs (the
    fusion settings given here then apply to a cheap view of it, `Ensemble.with_fusion`).

    Main member: `main=None` is the ensemble's, by default `"auto"`: for chat and completion
    alike (this is a chat model) each request is led by the member with a chat template
    that reads it best; with an ensemble whose main is an index, `default_chat_main()` (the
    first member with a chat template). With the default members (Gemma-3-270m, a base model
    without a template, and SmolLM2-135M-Instruct) that is SmolLM2; Gemma still contributes
    through fusion. Give `main=` to choose.

    Chat: `chat` / `stream_chat` pass the conversation to the engine, which renders it
    with each member's own chat template (LlamaIndex's generic `messages_to_prompt` is
    not used). Roles map onto system / user / assistant / tool (`developer` -> system;
    `chatbot`, `model` -> assistant; `function` -> tool).

    Tools: a `FunctionCallingLLM` (`chat_with_tools`, `predict_and_call`,
    `get_tool_calls_from_response` and their async and streaming versions), so
    `FunctionAgent` and `AgentWorkflow` run on it. The engine describes the tools to each
    member and constrains the main member so a call always parses and its arguments match
    the tool's schema (docs/constraints.md); `tool_required=True` forces a call. One call
    per reply. `structured_predict` / `as_structured_llm` constrain the reply to the output
    class's JSON schema.

    Per call: every generation setting and the fusion settings (`method`, `gate`, `main`,
    `weights`, `tau`, `fusion_top_k`, `candidates`, `eta`, `steps`) are keyword overrides,
    e.g. `llm.complete(p, method="union")` or `llm.complete(p, eta=0)` (the main member
    alone; a cached view, nothing reloads); a call's `stop` adds to the field's. Other
    keywords LlamaIndex passes along are ignored.
    Concurrent calls (threads or tasks) are safe and share forward passes: the engine's
    scheduler decodes them together in one batch (continuous batching).
    """

    chat_adapter = True

    context_window: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Context window reported in metadata. None: the smallest of the members' "
            "context windows minus max_new_tokens (reading it loads the models)."
        ),
    )

    @classmethod
    def class_name(cls) -> str:
        """Name of this class in LlamaIndex's serialised form."""
        return "DeepEnLLM"

    # ----------------------------------------------------------------- metadata

    @property
    def metadata(self) -> LLMMetadata:
        """Context window (smallest member's minus output room), num_output, names.

        The main member shows as `auto` when each request chooses it (`main="auto"`, the
        default) or while it is chosen by the chat rule and the members are not loaded.
        """
        window = self._context_window()
        names = self.member_names
        if self.is_loaded:
            auto = self.ensemble.fusion.main == "auto"
            main = "auto" if auto else self.ensemble.main.name
        else:
            main = names[self.main] if isinstance(self.main, int) else "auto"
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=f"deepen[{' + '.join(names)}; main={main}]",
        )

    def _context_window(self) -> int:
        if self.context_window is not None:
            return self.context_window
        windows = [m.context_window for m in self._load().members if m.context_window]
        smallest = min(windows) if windows else DEFAULT_CONTEXT_WINDOW
        return max(1, smallest - self.max_new_tokens)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if not formatted and self.completion_to_prompt is not None:
            return self.completion_to_prompt(prompt)
        return prompt

    # ----------------------------------------------------------------- completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Continue `prompt` (a plain text, fed to every member as is)."""
        call = self._call_settings(kwargs)
        result = call.view.generate(self._prompt(prompt, formatted), call.config)
        return _completion(call.view, result)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream `complete`: responses with cumulative `text` and the new `delta`.

        The last response has an empty delta and carries `raw` (usage, finish_reason).
        """
        call = self._call_settings(kwargs)
        events = engine_stream(call.view, self._prompt(prompt, formatted), call.config)
        return _responses(call.view, events, _same)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """`complete` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        result = await call.view.agenerate(self._prompt(prompt, formatted), call.config)
        return _completion(call.view, result)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """`stream_complete` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        events = engine_astream(call.view, self._prompt(prompt, formatted), call.config)
        return _aresponses(call.view, events, _same)

    # ----------------------------------------------------------------- chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation; each member renders it with its own chat template.

        `tools` (OpenAI function specs) and `tool_choice` are passed to the engine (as
        `chat_with_tools` does); a call's settings (`max_new_tokens=`, `eta=`,
        `json_schema=`, ...) apply to this call.
        """
        events = self._chat_events(self._call_settings(kwargs), messages, kwargs)
        return _last(_responses(events[0], events[1], _chat_response))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream `chat`: responses with the cumulative message and the new `delta`; the
        last one carries the tool calls, if any.
        """
        view, events = self._chat_events(self._call_settings(kwargs), messages, kwargs)
        return _responses(view, events, _chat_response)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        view, events = self._achat_events(call, messages, kwargs)
        last = None
        async for response in _aresponses(view, events, _chat_response):
            last = response
        assert last is not None  # the engine always ends with a final event
        return last

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        view, events = self._achat_events(call, messages, kwargs)
        return _aresponses(view, events, _chat_response)

    def _chat_events(
        self, call: CallSettings, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Ensemble, Generator[StreamEvent, None, None]]:
        tools, choice = kwargs.get("tools"), kwargs.get("tool_choice")
        conversation = to_engine_messages(messages)
        return call.view, engine_stream(call.view, conversation, call.config, None, tools, choice)

    def _achat_events(
        self, call: CallSettings, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Ensemble, AsyncGenerator[StreamEvent, None]]:
        tools, choice = kwargs.get("tools"), kwargs.get("tool_choice")
        conversation = to_engine_messages(messages)
        return call.view, engine_astream(call.view, conversation, call.config, None, tools, choice)

    # ----------------------------------------------------------------- tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`chat` arguments for `chat_with_tools`: the messages, the tools as OpenAI
        function specs, and tool_choice (`tool_required=True`: "required"). One call per
        reply, whatever `allow_parallel_tool_calls` says.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {
            "messages": messages,
            "tools": specs or None,
            "tool_choice": tool_choice if specs else None,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's tool calls (ToolCallBlocks) as ToolSelections.

        Raises:
            ValueError: no tool call, when `error_on_no_tool_call`.
        """
        selections = tool_selections(response.message)
        if not selections and error_on_no_tool_call:
            raise ValueError(
                "Expected at least one tool call, got none: the reply is text "
                f"({response.message.content!r}); pass tool_required=True to force a call."
            )
        return selections


# ----------------------------------------------------------------- responses


def _raw(view: Ensemble, event: StreamEvent | GenerationResult) -> dict[str, Any]:
    """A finished row's `raw`: OpenAI-style usage, finish reason, ids, the member that led
    the row (with `main="auto"` chosen from its prompt).
    """
    leader = (event.usage.leader if event.usage else "") or view.main.name
    return {
        "usage": token_counts(event.usage, leader),
        "finish_reason": event.finish_reason,
        "token_ids": event.token_ids,
        "main_member": leader,
        "deepen_usage": event.usage,
        "tool_calls": list(event.tool_calls or []),
    }


def _completion(
    view: Ensemble, result: GenerationResult | list[GenerationResult]
) -> CompletionResponse:
    """One prompt's result as a CompletionResponse."""
    assert isinstance(result, GenerationResult)  # one prompt, one result
    return CompletionResponse(text=result.text, raw=_raw(view, result))


def _response(view: Ensemble, event: StreamEvent, text: str) -> CompletionResponse:
    """One engine event as a response; `text` is the cumulative text so far."""
    raw = _raw(view, event) if event.finish_reason is not None else None
    return CompletionResponse(text=text, delta=event.delta, raw=raw)


def _responses(
    view: Ensemble,
    events: Generator[StreamEvent, None, None],
    wrap: Callable[[CompletionResponse], _R],
) -> Generator[_R, None, None]:
    """Engine events as cumulative responses (wrapped for chat); closing it closes the
    engine stream, which frees the request's rows and caches if stopped early.
    """
    text = ""
    with closing(events):
        for event in events:
            text += event.delta
            yield wrap(_response(view, event, text))


async def _aresponses(
    view: Ensemble,
    events: AsyncGenerator[StreamEvent, None],
    wrap: Callable[[CompletionResponse], _R],
) -> AsyncGenerator[_R, None]:
    """`_responses` for an async engine stream."""
    text = ""
    async with aclosing(events):
        async for event in events:
            text += event.delta
            yield wrap(_response(view, event, text))


def _same(response: CompletionResponse) -> CompletionResponse:
    return response


def _chat_response(response: CompletionResponse) -> ChatResponse:
    calls = (response.raw or {}).get("tool_calls") or []
    return ChatResponse(
        message=response_message(response.text, calls), delta=response.delta, raw=response.raw
    )


def _last(responses: Generator[_R, None, None]) -> _R:
    """The last of a response stream (the whole answer, with usage and tool calls)."""
    last = None
    for response in responses:
        last = response
    assert last is not None  # the engine always ends with a final event
    return last
