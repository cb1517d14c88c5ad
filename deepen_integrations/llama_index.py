"""LlamaIndex adapter: `DeepEnLLM`, a `CustomLLM` backed by a deepen `Ensemble`.

Data flow (one request)::

    LlamaIndex (query engine, chat engine, agent, ...)
      |  complete(prompt) / chat([ChatMessage, ...]) and their stream / async variants
      v
    DeepEnLLM
      |  settings -> GenerationConfig keywords (max_new_tokens, stop, temperature, ...)
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
vocabulary the answer is written in), so LlamaIndex's `TokenCountingHandler` counts the
engine's own numbers. The async methods run decoding in a worker thread (the engine's
`astream`), so the event loop stays free; LlamaIndex's callback decorators wrap every
public method, so callbacks and instrumentation events fire as for any other LLM.

Example::

    from deepen_integrations.llama_index import DeepEnLLM

    llm = DeepEnLLM(max_new_tokens=64)  # cheap: the models load on first use
    print(llm.complete("The capital of France is").text)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

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
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from deepen_engine import (
    DEFAULT_MEMBERS,
    ConfigError,
    Ensemble,
    FusionConfig,
    GenerationConfig,
    GenerationResult,
    MemberSpec,
    StreamEvent,
    Usage,
)

__all__ = ["DeepEnLLM", "CHAT_MEMBER"]

CHAT_MEMBER = "smollm2-135m-instruct"
"""The chat-tuned default member; `DeepEnLLM` makes it the main member by default."""

# Adapter field -> FusionConfig field.
_FUSION_FIELDS = {
    "main": "main",
    "weights": "weights",
    "tau": "tau",
    "eta": "eta",
    "steps": "steps",
    "candidates": "candidates",
    "fusion_top_k": "top_k",
    "min_anchors": "min_anchors",
}
# Generation settings a call may override as keyword arguments.
_GENERATION_KEYS = (
    "max_new_tokens",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "truncation",
)
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


class DeepEnLLM(CustomLLM):
    """A LlamaIndex LLM generating with a deepen token-level ensemble of local models.

    Construction is cheap and validates every setting (a bad one raises `ValueError`
    naming the field) without loading anything; the models load on first use (a call, or
    reading `metadata` when `context_window` is not given) and are cached on the instance.
    Pass `ensemble=` to share one ready `Ensemble` between several LLMs (the fusion
    settings given here then apply to a cheap view of it, `Ensemble.with_fusion`).

    Main member: with the default members (Gemma-3-270m, a base model that does not
    chat, and SmolLM2-135M-Instruct, chat-tuned) and `main=None`, the main member is
    SmolLM2-135M-Instruct (index 1), so chats, query engines and agents get sensible
    answers; Gemma still contributes through fusion. With other `models`, `main=None`
    means member 0; with `ensemble=`, the ensemble's own main member. Give `main=` to
    choose.

    Chat: `chat` / `stream_chat` pass the conversation to the engine, which renders it
    with each member's own chat template (LlamaIndex's generic `messages_to_prompt` is
    not used). Roles map onto system / user / assistant (`developer` -> system;
    `chatbot`, `model` -> assistant; `tool`, `function` -> user).

    The fusion settings are read when the members load (or at construction, with
    `ensemble=`); to change them afterwards, make a new `DeepEnLLM` (with `ensemble=`
    the loaded members are shared, so that is cheap). Generation settings are read on
    every call.

    Calls accept the generation settings as keyword overrides (`max_new_tokens`, `stop`,
    `temperature`, `top_p`, `top_k`, `seed`, `truncation`); other keywords LlamaIndex passes
    along are ignored. Concurrent calls (threads or tasks) are safe: the engine runs one request
    at a time per set of loaded members.
    """

    models: list[Any] | None = Field(
        default=None,
        description=(
            "Members to load, in order: embedded names, .gguf files, model folders, hub ids, "
            "(model, tokenizer) pairs or MemberSpecs. None: the default members "
            f"{list(DEFAULT_MEMBERS)}."
        ),
    )
    main: int | None = Field(
        default=None,
        description=(
            "Index of the member whose vocabulary the answer is written in. None: the "
            "chat-tuned member for the default members, else 0 (or the given ensemble's)."
        ),
    )
    weights: list[float] | None = Field(
        default=None, description="One non-negative weight per member. None: uniform."
    )
    tau: float | None = Field(
        default=None, description="Fusion: relative-representation temperature."
    )
    eta: float | None = Field(
        default=None, description="Fusion: inverse-search learning rate (0: main member only)."
    )
    steps: int | None = Field(default=None, description="Fusion: inverse-search steps.")
    candidates: int | None = Field(
        default=None, description="Fusion: main-member candidates searched per step."
    )
    fusion_top_k: int | None = Field(
        default=None, description="Fusion: tokens kept from each member's distribution."
    )
    min_anchors: int | None = Field(
        default=None, description="Fusion: fewest shared anchor tokens accepted."
    )
    fusion_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other FusionConfig fields (e.g. weight_decay, row_cache_size).",
    )
    max_new_tokens: int = Field(
        default=256, description="Most tokens to generate per call (the metadata's num_output)."
    )
    temperature: float = Field(default=0.0, description="Sampling temperature; 0: greedy.")
    top_p: float = Field(default=1.0, description="Nucleus sampling cut; 1.0: none.")
    top_k: int = Field(default=0, description="Sample among the top_k tokens; 0: no cut.")
    seed: int | None = Field(default=None, description="Sampling seed; None: fresh per call.")
    truncation: str = Field(
        default="error",
        description=(
            "A prompt too long for a member's context window: 'error' raises ConfigError; "
            "'left' drops each member's oldest prompt tokens so the reply fits."
        ),
    )
    stop: list[str] | None = Field(
        default=None, description="Strings that end generation (cut before the first one)."
    )
    context_window: int | None = Field(
        default=None,
        description=(
            "Context window reported in metadata. None: the smallest of the members' "
            "context windows minus max_new_tokens (reading it loads the models)."
        ),
    )

    _ensemble: Ensemble | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _shared: bool = PrivateAttr(default=False)  # a ready ensemble was given

    def __init__(self, *, ensemble: Ensemble | None = None, **data: Any) -> None:
        """Validate the settings; keep `ensemble` (a ready `Ensemble`) if given.

        Raises:
            ValueError (`deepen_engine.ConfigError`): a bad setting, naming the field.
        """
        super().__init__(**data)
        if ensemble is not None:
            if not isinstance(ensemble, Ensemble):
                raise ConfigError(
                    f"DeepEnLLM.ensemble must be a deepen_engine.Ensemble, got "
                    f"{type(ensemble).__name__}."
                )
            if self.models is not None:
                raise ConfigError(
                    "DeepEnLLM.models and DeepEnLLM.ensemble are both given; give one."
                )
        self._shared = ensemble is not None
        self._check_settings(ensemble)
        if ensemble is not None:
            overrides = self._fusion_overrides()
            try:
                self._ensemble = ensemble.with_fusion(**overrides) if overrides else ensemble
            except ConfigError as exc:
                raise ConfigError(f"DeepEnLLM: {exc}") from None

    @classmethod
    def class_name(cls) -> str:
        """Name of this class in LlamaIndex's serialised form."""
        return "DeepEnLLM"

    # ----------------------------------------------------------------- settings

    def _member_count(self) -> int | None:
        if self._ensemble is not None:
            return len(self._ensemble.members)
        if self.models is None:
            return len(DEFAULT_MEMBERS)
        if isinstance(self.models, (list, tuple)):
            return len(self.models)
        return None

    def _resolved_main(self) -> int | None:
        """The main member index to request (None: keep the given ensemble's)."""
        if self.main is not None:
            return self.main
        if self._shared:
            return None
        if self.models is None:
            return DEFAULT_MEMBERS.index(CHAT_MEMBER)
        return 0

    def _fusion_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.fusion_kwargs)
        for field, engine_field in _FUSION_FIELDS.items():
            value = self._resolved_main() if field == "main" else getattr(self, field)
            if value is not None:
                out[engine_field] = value
        return out

    def _check_settings(self, ensemble: Ensemble | None) -> None:
        if self.models is not None and not self.models:
            raise ConfigError("DeepEnLLM.models is empty; give at least one model.")
        for field, engine_field in _FUSION_FIELDS.items():
            value = getattr(self, field)
            if value is not None:
                _check(FusionConfig, field, engine_field, value)
        for key, value in self.fusion_kwargs.items():
            own = next((f for f, e in _FUSION_FIELDS.items() if e == key), None)
            if own is not None:
                raise ConfigError(
                    f"DeepEnLLM.fusion_kwargs[{key!r}]: set it as DeepEnLLM.{own} instead."
                )
            _check(FusionConfig, f"fusion_kwargs[{key!r}]", key, value)
        for key in _GENERATION_KEYS:
            value = getattr(self, key)
            if value is not None:
                _check(GenerationConfig, key, key, value)
        n = len(ensemble.members) if ensemble is not None else self._member_count()
        if n is not None:
            main = self._resolved_main()
            if main is not None and main >= n:
                raise ConfigError(
                    f"DeepEnLLM.main={main} is out of range for {n} members; give an index "
                    f"from 0 to {n - 1}."
                )
            if self.weights is not None and len(self.weights) != n:
                raise ConfigError(
                    f"DeepEnLLM.weights has {len(self.weights)} values for {n} members; give "
                    "one weight per member, in the members' order."
                )
        if self.context_window is not None and self.context_window < 1:
            raise ConfigError(f"DeepEnLLM.context_window must be >= 1, got {self.context_window}.")

    def _generation_kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        settings: dict[str, Any] = {key: getattr(self, key) for key in _GENERATION_KEYS}
        settings["stop"] = list(self.stop or [])
        for key in _GENERATION_KEYS:
            if key in overrides:
                settings[key] = overrides[key]
        if settings["stop"] is None:
            settings["stop"] = []
        elif isinstance(settings["stop"], str):
            settings["stop"] = [settings["stop"]]
        return settings

    # ----------------------------------------------------------------- members

    @property
    def ensemble(self) -> Ensemble:
        """The ensemble (loaded on first access, then cached on this instance)."""
        if self._ensemble is None:
            with self._load_lock:
                if self._ensemble is None:
                    members = DEFAULT_MEMBERS if self.models is None else self.models
                    self._ensemble = Ensemble(members, **self._fusion_overrides())
        return self._ensemble

    @property
    def is_loaded(self) -> bool:
        """Whether the members are loaded (or a ready ensemble was given)."""
        return self._ensemble is not None

    async def _aensemble(self) -> Ensemble:
        if self._ensemble is not None:
            return self._ensemble
        return await asyncio.to_thread(lambda: self.ensemble)

    def _member_names(self) -> list[str]:
        if self._ensemble is not None:
            return [m.name for m in self._ensemble.members]
        members = DEFAULT_MEMBERS if self.models is None else self.models
        return [_source_name(m) for m in members]

    @property
    def metadata(self) -> LLMMetadata:
        """Context window (smallest member's minus output room), num_output, names."""
        names = self._member_names()
        main = self._resolved_main()
        if main is None and self._ensemble is not None:
            main = self._ensemble.fusion.main
        main_name = names[main] if main is not None and main < len(names) else "?"
        return LLMMetadata(
            context_window=self._context_window(),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=f"deepen[{' + '.join(names)}; main={main_name}]",
        )

    def _context_window(self) -> int:
        if self.context_window is not None:
            return self.context_window
        windows = [m.context_window for m in self.ensemble.members if m.context_window]
        smallest = min(windows) if windows else DEFAULT_CONTEXT_WINDOW
        return max(1, smallest - self.max_new_tokens)

    # ----------------------------------------------------------------- responses

    def _raw(self, ens: Ensemble, usage: Usage | None, reason: str | None, ids: Any) -> dict:
        prompt = (usage.prompt_tokens.get(ens.main.name, 0) if usage else 0) or 0
        completion = usage.completion_tokens if usage else 0
        return {
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "finish_reason": reason,
            "token_ids": ids,
            "main_member": ens.main.name,
            "deepen_usage": usage,
        }

    def _result_response(self, ens: Ensemble, result: GenerationResult) -> CompletionResponse:
        raw = self._raw(ens, result.usage, result.finish_reason, result.token_ids)
        return CompletionResponse(text=result.text, raw=raw)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if not formatted and self.completion_to_prompt is not None:
            return self.completion_to_prompt(prompt)
        return prompt

    # ----------------------------------------------------------------- completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Continue `prompt` (a plain text, fed to every member as is)."""
        ens = self.ensemble
        result = ens.generate(self._prompt(prompt, formatted), **self._generation_kwargs(kwargs))
        assert isinstance(result, GenerationResult)
        return self._result_response(ens, result)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream `complete`: responses with cumulative `text` and the new `delta`.

        The last response has an empty delta and carries `raw` (usage, finish_reason).
        """
        ens = self.ensemble
        events = ens.stream(self._prompt(prompt, formatted), **self._generation_kwargs(kwargs))
        return self._responses(ens, events, _same)

    def _response(self, ens: Ensemble, event: StreamEvent, text: str) -> CompletionResponse:
        """One engine event as a response; `text` is the cumulative text so far."""
        raw = None
        if event.finish_reason is not None:
            raw = self._raw(ens, event.usage, event.finish_reason, event.token_ids)
        return CompletionResponse(text=text, delta=event.delta, raw=raw)

    def _responses(
        self,
        ens: Ensemble,
        events: Iterator[StreamEvent],
        wrap: Callable[[CompletionResponse], Any],
    ) -> Iterator[Any]:
        """Engine events as cumulative responses (wrapped for chat); closing it closes
        the engine stream, which frees the caches and the engine lock if stopped early.
        """
        text = ""
        try:
            for event in events:
                text += event.delta
                yield wrap(self._response(ens, event, text))
        finally:
            events.close()

    async def _aresponses(
        self,
        ens: Ensemble,
        events: AsyncIterator[StreamEvent],
        wrap: Callable[[CompletionResponse], Any],
    ) -> AsyncIterator[Any]:
        """`_responses` for an async engine stream."""
        text = ""
        try:
            async for event in events:
                text += event.delta
                yield wrap(self._response(ens, event, text))
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """`complete` for asyncio: decoding runs in a worker thread."""
        ens = await self._aensemble()
        result = await ens.agenerate(
            self._prompt(prompt, formatted), **self._generation_kwargs(kwargs)
        )
        assert isinstance(result, GenerationResult)
        return self._result_response(ens, result)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """`stream_complete` for asyncio: decoding runs in a worker thread."""
        ens = await self._aensemble()
        settings = self._generation_kwargs(kwargs)
        text_prompt = self._prompt(prompt, formatted)
        return self._aresponses(ens, ens.astream(text_prompt, **settings), _same)

    # ----------------------------------------------------------------- chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation; each member renders it with its own chat template."""
        ens = self.ensemble
        result = ens.generate(to_engine_messages(messages), **self._generation_kwargs(kwargs))
        assert isinstance(result, GenerationResult)
        return _chat_response(self._result_response(ens, result))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream `chat`: responses with the cumulative message and the new `delta`."""
        ens = self.ensemble
        events = ens.stream(to_engine_messages(messages), **self._generation_kwargs(kwargs))
        return self._responses(ens, events, _chat_response)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat` for asyncio: decoding runs in a worker thread."""
        ens = await self._aensemble()
        result = await ens.agenerate(
            to_engine_messages(messages), **self._generation_kwargs(kwargs)
        )
        assert isinstance(result, GenerationResult)
        return _chat_response(self._result_response(ens, result))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` for asyncio: decoding runs in a worker thread."""
        ens = await self._aensemble()
        conversation = to_engine_messages(messages)
        settings = self._generation_kwargs(kwargs)
        return self._aresponses(ens, ens.astream(conversation, **settings), _chat_response)


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


def _same(response: CompletionResponse) -> CompletionResponse:
    return response


def _chat_response(response: CompletionResponse) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
        delta=response.delta,
        raw=response.raw,
    )


def _check(model: type, field: str, engine_field: str, value: Any) -> None:
    """Validate one setting against the engine's config model; name the adapter field."""
    try:
        model(**{engine_field: value})
    except ConfigError as exc:
        raise ConfigError(f"DeepEnLLM.{field}: {exc}") from None


def _source_name(member: Any) -> str:
    """A display name for a member not loaded yet."""
    if isinstance(member, MemberSpec):
        return member.name or _source_name(member.source)
    if isinstance(member, str):
        return member.rstrip("/").rsplit("/", 1)[-1]
    return type(member[0]).__name__ if isinstance(member, tuple) else type(member).__name__
