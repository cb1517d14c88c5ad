"""LlamaIndex adapter: `DeepEnLLM`, a `CustomLLM` backed by a deepen `Ensemble`.

Data flow (one request)::

    LlamaIndex (query engine, chat engine, agent, ...)
      |  complete(prompt) / chat([ChatMessage, ...]) and their stream / async variants,
      |  with optional per-call settings (`complete(p, max_new_tokens=8, eta=0)`)
      v
    DeepEnLLM (settings shared with the LangChain adapter: `_settings.DeepEnSettings`)
      |  settings -> a `with_fusion` view of the ensemble (cached per fusion setting; main
      |      member: `main`, else `Ensemble.default_chat_main()`) and a GenerationConfig
      |  ChatMessage list -> [{"role", "content"}, ...]  (roles mapped onto
      |      system / user / assistant; each member renders it with its OWN chat template)
      |  first use only: Ensemble(models, **fusion settings), cached on the instance
      v
    Ensemble.generate / stream / agenerate / astream   (engine lock: one request at a time)
      |  GenerationResult / StreamEvent (text deltas; a final event with usage)
      v
    CompletionResponse / ChatResponse
         text     = the answer so far (cumulative), delta = the new piece (streams)
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
from typing import Any, TypeVar

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
from llama_index.core.llms.custom import CustomLLM

from deepen_engine import ConfigError, Ensemble, GenerationResult, StreamEvent

from ._settings import DeepEnSettings, engine_astream, engine_stream, token_counts

__all__ = ["DeepEnLLM", "to_engine_messages"]

_R = TypeVar("_R", CompletionResponse, ChatResponse)

# LlamaIndex roles -> the engine's three roles.
_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "user",
    MessageRole.FUNCTION: "user",
}


class DeepEnLLM(DeepEnSettings, CustomLLM):
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

    Main member: `main=None` is the engine's rule for chat, `Ensemble.default_chat_main()`,
    for chat and completion alike (this is a chat model) and with or without `ensemble=`:
    the first member with a chat template, else the ensemble's main. With the default
    members (Gemma-3-270m, a base model without a template, and SmolLM2-135M-Instruct) that
    is SmolLM2 (index 1); Gemma still contributes through fusion. Give `main=` to choose.

    Chat: `chat` / `stream_chat` pass the conversation to the engine, which renders it
    with each member's own chat template (LlamaIndex's generic `messages_to_prompt` is
    not used). Roles map onto system / user / assistant (`developer` -> system;
    `chatbot`, `model` -> assistant; `tool`, `function` -> user).

    Per call: every generation setting and the fusion settings (`method`, `gate`, `main`,
    `weights`, `tau`, `fusion_top_k`, `candidates`, `eta`, `steps`) are keyword overrides,
    e.g. `llm.complete(p, method="union")` or `llm.complete(p, eta=0)` (the main member
    alone; a cached view, nothing reloads); a call's `stop` adds to the field's. Other
    keywords LlamaIndex passes along are ignored.
    Concurrent calls (threads or tasks) are safe: the engine runs one request at a time per
    set of loaded members.
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

        The main member shows as `auto` while it is chosen by the chat rule and the members
        are not loaded (only when `context_window` is given: otherwise reading this loads).
        """
        window = self._context_window()
        names = self.member_names
        if self.is_loaded:
            main = self.ensemble.main.name
        else:
            main = names[self.main] if self.main is not None else "auto"
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
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
        """Answer a conversation; each member renders it with its own chat template."""
        call = self._call_settings(kwargs)
        result = call.view.generate(to_engine_messages(messages), call.config)
        return _chat_response(_completion(call.view, result))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream `chat`: responses with the cumulative message and the new `delta`."""
        call = self._call_settings(kwargs)
        events = engine_stream(call.view, to_engine_messages(messages), call.config)
        return _responses(call.view, events, _chat_response)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        result = await call.view.agenerate(to_engine_messages(messages), call.config)
        return _chat_response(_completion(call.view, result))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` for asyncio: decoding runs in a worker thread."""
        call = await self._acall_settings(kwargs)
        events = engine_astream(call.view, to_engine_messages(messages), call.config)
        return _aresponses(call.view, events, _chat_response)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the engine's `[{"role", "content"}, ...]` conversation.

    Only text content is kept (other blocks, e.g. images, are dropped).
    """
    out = []
    for i, message in enumerate(messages):
        role = _ROLES.get(MessageRole(message.role))
        if role is None:
            raise ConfigError(f"messages[{i}] has role {message.role!r}, which deepen cannot map.")
        out.append({"role": role, "content": message.content or ""})
    return out


# ----------------------------------------------------------------- responses


def _raw(view: Ensemble, event: StreamEvent | GenerationResult) -> dict[str, Any]:
    """A finished row's `raw`: OpenAI-style usage, finish reason, ids, the main member."""
    return {
        "usage": token_counts(event.usage, view.main.name),
        "finish_reason": event.finish_reason,
        "token_ids": event.token_ids,
        "main_member": view.main.name,
        "deepen_usage": event.usage,
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
    engine stream, which frees the caches and the engine lock if stopped early.
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
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
        delta=response.delta,
        raw=response.raw,
    )
