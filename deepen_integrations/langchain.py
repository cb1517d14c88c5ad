"""LangChain adapters for deepen ensembles: `DeepEnLLM` (text in, text out) and `ChatDeepEn`
(messages in, an `AIMessage` out, with tool calling and structured output).

Data flow of one call::

    LangChain input (str prompts, or BaseMessages)
      -> settings: the instance's fields, overridden per call (`invoke(x, max_tokens=8)`),
         stop strings merged (field first, then call-time)
      -> the engine: the lazily loaded `Ensemble` (or the shared `ensemble=`), viewed with
         the fusion settings (`Ensemble.with_fusion`, cheap, cached per setting)
      -> prompts: text as is; messages as a chat conversation ({"role", "content"} dicts,
         tool calls and tool results written as text) that each member renders with its own
         chat template; bound tools become a system instruction (`TOOL_INSTRUCTION`)
      -> `Ensemble.stream` / `Ensemble.astream`: text deltas, then one final event per row
         with finish_reason and usage
      -> LangChain output: GenerationChunk / ChatGenerationChunk per delta (callbacks get
         every one), a last chunk with usage and metadata; `_generate` aggregates the same
         event stream, so streamed and non-streamed text are equal. With tools bound, the
         reply is parsed into `AIMessage.tool_calls` (`parse_tool_calls`).

Models load on first use (about 8 s for the two default members on CPU) and stay cached
on the instance. To share one loaded ensemble between wrappers, build it once and pass
`ensemble=`::

    from deepen_engine import Ensemble
    ens = Ensemble()
    llm = DeepEnLLM(ensemble=ens, max_tokens=32)
    chat = ChatDeepEn(ensemble=ens)
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.language_models.base import LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import InvalidToolCall, ToolCall
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from deepen_engine import (
    DEFAULT_MEMBERS,
    Ensemble,
    GenerationConfig,
    MemberSpec,
    StreamEvent,
    Usage,
)

__all__ = ["TOOL_INSTRUCTION", "ChatDeepEn", "DeepEnLLM", "parse_tool_calls"]

PROVIDER = "deepen"

# Generation settings a call may override (`invoke(x, max_tokens=8)`), by keyword.
_GENERATION_KEYS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "truncation",
    "batch_size",
)
# Fusion settings a call may override; the value is FusionConfig's name for it.
_FUSION_KEYS = {
    "main": "main",
    "weights": "weights",
    "tau": "tau",
    "fusion_top_k": "top_k",
    "candidates": "candidates",
    "eta": "eta",
    "steps": "steps",
}
_LOAD_LOCK = threading.Lock()  # one load at a time (module level: instances stay copyable)


class _DeepEnSettings(BaseModel):
    """Settings shared by `DeepEnLLM` and `ChatDeepEn`, and the lazy engine behind them."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    models: list[Any] = Field(default_factory=lambda: list(DEFAULT_MEMBERS))
    """Members to load, in order: embedded names (`gemma-3-270m`,
    `smollm2-135m-instruct`), `.gguf` files, model folders, hub ids, `(model, tokenizer)`
    pairs or `MemberSpec`s. Default: the two embedded members. Ignored when `ensemble` is
    given (giving both raises)."""

    ensemble: Ensemble | None = Field(default=None, exclude=True)
    """A ready `Ensemble` to use instead of loading `models`; share one between wrappers
    (requests on it are serialised by the engine)."""

    main: int | None = Field(default=None, ge=0)
    """Index of the member whose vocabulary the fused tokens come from. `None`: the
    engine's default (see each class for its rule)."""

    weights: list[float] | None = None
    """One non-negative weight per member (normalised to sum 1). `None`: the ensemble's
    weights (uniform by default)."""

    tau: float | None = Field(default=None, gt=0)
    """Temperature of the relative representation (FusionConfig.tau). `None`: default."""

    fusion_top_k: int | None = Field(default=None, ge=1)
    """Tokens taken from each member's distribution for fusion (FusionConfig.top_k; not
    the sampling `top_k`). `None`: default."""

    candidates: int | None = Field(default=None, ge=1)
    """Main-member tokens searched by the inverse transformation (FusionConfig.candidates).
    `None`: default."""

    eta: float | None = Field(default=None, ge=0)
    """Learning rate of the inverse search (FusionConfig.eta); `0` is the main member alone.
    `None`: default."""

    steps: int | None = Field(default=None, ge=0)
    """Optimiser steps of the inverse search (FusionConfig.steps); `0` is the main member
    alone. `None`: default."""

    min_anchors: int | None = Field(default=None, ge=1)
    """Fewest shared anchor tokens accepted when loading `models` (FusionConfig.min_anchors);
    lower it only for tiny test vocabularies. `None`: default."""

    max_new_tokens: int = Field(default=128, ge=1, alias="max_tokens")
    """Most tokens of the main member to generate (alias `max_tokens`)."""

    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature of the fused distribution; `0` is greedy."""

    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling threshold in (0, 1]; `1` is no cut."""

    top_k: int = Field(default=0, ge=0)
    """Sample among the `top_k` most likely fused tokens; `0` is no cut."""

    seed: int | None = None
    """Seed of each row's random stream (same seed, same prompt: same text). `None`: fresh."""

    truncation: Literal["error", "left"] = "error"
    """A prompt too long for a member's context window: `"error"` raises `ConfigError`;
    `"left"` drops each member's oldest prompt tokens so the reply fits (docs/errors.md)."""

    stop: list[str] | None = None
    """Strings that end generation; the text is cut exactly before the first one. Merged
    with the call's `stop`."""

    batch_size: int | None = Field(default=None, ge=1)
    """Prompts per engine batch in `batch`/`generate` (default: all at once). Does not
    change the text."""

    _loaded: Ensemble | None = PrivateAttr(default=None)
    _views: dict[str, Ensemble] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_settings(self) -> _DeepEnSettings:
        """Check settings that depend on each other, without loading any model."""
        if self.ensemble is not None and "models" in self.model_fields_set:
            raise ValueError("give either models or ensemble, not both")
        if self.ensemble is None and not self.models:
            raise ValueError("models is empty; give at least one member")
        n = self._member_count()
        if self.main is not None and self.main >= n:
            raise ValueError(f"main={self.main} is out of range for {n} members (0..{n - 1})")
        if self.weights is not None:
            _check_weights(self.weights, n)
        if self.stop is not None and any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self

    def _member_count(self) -> int:
        return len(self.ensemble.members) if self.ensemble is not None else len(self.models)

    @property
    def member_names(self) -> list[str]:
        """The members' display names (without loading when `models` are names/paths)."""
        if self.ensemble is not None:
            return [m.name for m in self.ensemble.members]
        if self._loaded is not None:
            return [m.name for m in self._loaded.members]
        return [_source_name(m) for m in self.models]

    @property
    def model_name(self) -> str:
        """A name for the ensemble, e.g. `deepen:gemma-3-270m+smollm2-135m-instruct`."""
        return f"{PROVIDER}:" + "+".join(self.member_names)

    @property
    def client(self) -> Ensemble:
        """The engine: `ensemble`, or `models` loaded on first use and cached here."""
        if self.ensemble is not None:
            return self.ensemble
        if self._loaded is None:
            with _LOAD_LOCK:
                if self._loaded is None:
                    extra = {} if self.min_anchors is None else {"min_anchors": self.min_anchors}
                    self._loaded = Ensemble(list(self.models), **extra)
        return self._loaded

    # --- settings of one call -------------------------------------------------------------

    def _default_main(self, ens: Ensemble) -> int | None:
        """The main member when `main` is None; None keeps the ensemble's."""
        return None

    def _call_settings(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Ensemble, GenerationConfig, int | None]:
        """(engine view, generation config, batch size) for a call's stop and overrides."""
        gen: dict[str, Any] = {k: getattr(self, k) for k in _GENERATION_KEYS}
        fusion: dict[str, Any] = {k: getattr(self, k) for k in _FUSION_KEYS}
        for key, value in kwargs.items():
            if key == "max_tokens":
                key = "max_new_tokens"
            if key in gen:
                gen[key] = value
            elif key in fusion:
                fusion[key] = value
            elif key.startswith("ls_") or key in _IGNORED_CALL_KEYS:
                continue  # LangChain's tracing hints; tools are handled by the caller
            else:
                raise ValueError(
                    f"{type(self).__name__} got an unknown call setting {key!r}; use one of "
                    f"{sorted([*gen, *fusion, 'max_tokens', 'stop'])}."
                )
        batch_size = gen.pop("batch_size")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config = GenerationConfig(**gen, stop=_merge_stop(self.stop, stop))
        return self._view(fusion), config, batch_size

    def _view(self, fusion: dict[str, Any]) -> Ensemble:
        ens = self.client
        if fusion["main"] is None:
            fusion["main"] = self._default_main(ens)
        n = len(ens.members)
        if fusion["main"] is not None and not 0 <= fusion["main"] < n:
            raise ValueError(f"main={fusion['main']} is out of range for {n} members")
        if fusion["weights"] is not None:
            _check_weights(fusion["weights"], n)
        changes = {
            _FUSION_KEYS[k]: v
            for k, v in fusion.items()
            if v is not None and v != getattr(ens.fusion, _FUSION_KEYS[k])
        }
        if not changes:
            return ens
        key = json.dumps(changes, sort_keys=True)
        view = self._views.get(key)
        if view is None:
            view = ens.with_fusion(**changes)
            self._views[key] = view
        return view

    def _settings_params(self) -> dict[str, Any]:
        """Every setting that changes the output (LangChain's cache key and tracing)."""
        params: dict[str, Any] = {
            "model_name": self.model_name,
            "models": self.member_names,
        }
        if self.ensemble is not None:
            params["ensemble_fusion"] = self.ensemble.fusion.model_dump()
        if self.min_anchors is not None:
            params["min_anchors"] = self.min_anchors
        for key in (*_FUSION_KEYS, *_GENERATION_KEYS, "stop"):
            if key != "batch_size":
                params[key] = getattr(self, key)
        return params

    def _ls_params(
        self, base: LangSmithParams, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> LangSmithParams:
        base["ls_provider"] = PROVIDER
        base["ls_model_name"] = kwargs.get("model") or self.model_name
        base["ls_temperature"] = kwargs.get("temperature", self.temperature)
        base["ls_max_tokens"] = kwargs.get(
            "max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)
        )
        merged = _merge_stop(self.stop, stop)
        if merged:
            base["ls_stop"] = merged
        return base


_IGNORED_CALL_KEYS = frozenset({"tools", "tool_choice", "model"})


def _check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} values for {n} members; give one each")
    if any(not (w >= 0) or w == float("inf") for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if sum(weights) <= 0:
        raise ValueError("weights must not all be zero")


def _merge_stop(field: list[str] | None, call: list[str] | None) -> list[str]:
    out: list[str] = []
    for s in [*(field or []), *(call or [])]:
        if s not in out:
            out.append(s)
    return out


def _source_name(source: Any) -> str:
    if isinstance(source, MemberSpec):
        return source.name or _source_name(source.source)
    if isinstance(source, (str, Path)):
        text = str(source)
        return Path(text).name if ("/" in text and Path(text).exists()) else text
    if isinstance(source, tuple) and source:
        return type(source[0]).__name__
    return type(source).__name__


def _usage_dict(usage: Usage | None) -> dict[str, Any]:
    return asdict(usage) if usage is not None else {}


def _input_tokens(usage: Usage | None, main_name: str) -> int:
    if usage is None:
        return 0
    return int(usage.prompt_tokens.get(main_name, 0))


# ------------------------------------------------------------------------------------------
# DeepEnLLM
# ------------------------------------------------------------------------------------------


_MODEL_CONFIG = ConfigDict(
    extra="forbid", populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=()
)


class DeepEnLLM(_DeepEnSettings, BaseLLM):
    """A deepen ensemble as a LangChain text-completion model.

    Prompts go to the engine as plain text (each member tokenises it with its own special
    tokens). `main=None` keeps the ensemble's main member (member 0 unless the given
    `ensemble` says otherwise). `batch`/`generate` run all prompts through one engine call
    (in batches of `batch_size`); each prompt gives exactly the text it gives alone.

    Example:
        ```python
        from deepen_integrations.langchain import DeepEnLLM

        llm = DeepEnLLM(max_tokens=16)  # loads the default members on first use
        llm.invoke("The capital of France is")
        llm.invoke("Count: 1, 2,", max_tokens=8, stop=["5"])  # per-call settings
        ```
    """

    model_config = _MODEL_CONFIG

    @property
    def _llm_type(self) -> str:
        """The LangChain type name."""
        return "deepen"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that changes the output."""
        return self._settings_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith tracing parameters (provider, model name, temperature, ...)."""
        return self._ls_params(super()._get_ls_params(stop=stop, **kwargs), stop, kwargs)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Generate for all prompts in one engine call (tokens reach the callbacks when
        there is a single prompt).
        """
        view, config, batch_size = self._call_settings(stop, kwargs)
        collector = _LLMCollector(len(prompts), view.main.name, self.model_name)
        for event in view.stream(list(prompts), config, batch_size=batch_size):
            chunk = collector.add(event)
            if chunk is not None and run_manager is not None and len(prompts) == 1:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return collector.result()

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`_generate` for asyncio: the engine decodes in a worker thread."""
        view, config, batch_size = self._call_settings(stop, kwargs)
        collector = _LLMCollector(len(prompts), view.main.name, self.model_name)
        async for event in view.astream(list(prompts), config, batch_size=batch_size):
            chunk = collector.add(event)
            if chunk is not None and run_manager is not None and len(prompts) == 1:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return collector.result()

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        """Yield a chunk per text delta, then an empty one with finish_reason and usage."""
        view, config, _ = self._call_settings(stop, kwargs)
        events = view.stream(prompt, config)
        try:
            for event in events:
                chunk = self._llm_chunk(event, view.main.name)
                if chunk.text and run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            events.close()  # type: ignore[attr-defined]  # frees the caches when stopped early

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        """`_stream` for asyncio: the event loop stays free while the engine decodes."""
        view, config, _ = self._call_settings(stop, kwargs)
        events = view.astream(prompt, config)
        try:
            async for event in events:
                chunk = self._llm_chunk(event, view.main.name)
                if chunk.text and run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def _llm_chunk(self, event: StreamEvent, main_name: str) -> GenerationChunk:
        if event.finish_reason is None:
            return GenerationChunk(text=event.delta)
        return GenerationChunk(
            text=event.delta,
            generation_info=_generation_info(event, main_name, self.model_name),
        )


def _generation_info(event: StreamEvent, main_name: str, model_name: str) -> dict[str, Any]:
    return {
        "finish_reason": event.finish_reason,
        "model_name": model_name,
        "token_usage": _token_usage(
            _input_tokens(event.usage, main_name),
            event.usage.completion_tokens if event.usage else 0,
        ),
        "usage": _usage_dict(event.usage),
    }


def _token_usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _LLMCollector:
    """Aggregates a batch's events into an LLMResult, one generation per prompt."""

    def __init__(self, n: int, main_name: str, model_name: str) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self.infos: list[dict[str, Any] | None] = [None] * n
        self.main_name, self.model_name = main_name, model_name

    def add(self, event: StreamEvent) -> GenerationChunk | None:
        """Record one event; the text chunk it carries, if any."""
        if event.delta:
            self.parts[event.index].append(event.delta)
        if event.finish_reason is not None:
            self.infos[event.index] = _generation_info(event, self.main_name, self.model_name)
        return GenerationChunk(text=event.delta) if event.delta else None

    def result(self) -> LLMResult:
        """The LLMResult: texts, finish reasons, summed token usage and the model name."""
        missing = [i for i, info in enumerate(self.infos) if info is None]
        if missing:
            raise RuntimeError(f"the engine stream ended without final events for rows {missing}")
        prompt = sum(info["token_usage"]["prompt_tokens"] for info in self.infos if info)
        completion = sum(info["token_usage"]["completion_tokens"] for info in self.infos if info)
        return LLMResult(
            generations=[
                [Generation(text="".join(parts), generation_info=info)]
                for parts, info in zip(self.parts, self.infos)
            ],
            llm_output={
                "token_usage": _token_usage(prompt, completion),
                "model_name": self.model_name,
            },
        )


# ------------------------------------------------------------------------------------------
# ChatDeepEn
# ------------------------------------------------------------------------------------------

TOOL_INSTRUCTION = (
    "Tools (JSON schemas):\n{tools}\n\n"
    'To call a tool, reply with only a JSON object {{"name": "<tool name>", '
    '"arguments": {{...}}}} and nothing else. {choice}'
)
"""The system instruction that describes bound tools (`{tools}`: one JSON object per line,
`{"name", "description", "parameters"}`; `{choice}`: what `tool_choice` asks for). It is
appended to the conversation's first system message, or is the first message if there is
none."""

_CHOICE_TEXT = {
    "auto": "If no tool is needed, answer the user directly in plain text.",
    "any": "You must call one of the tools.",
}


class ChatDeepEn(_DeepEnSettings, BaseChatModel):
    """A deepen ensemble as a LangChain chat model.

    Messages go to the engine as a chat conversation that each member renders with its own
    chat template: system -> "system", human -> "user", AI -> "assistant" (its tool calls
    written as the JSON objects the model is asked to emit), tool results -> "user"
    (`Tool <name> returned: <content>`). Only the text of message content is used.

    Main member: `main=None` picks the first member with a chat template of its own (its
    tokenizer's, or `MemberSpec.chat_template`); if none has one, the ensemble's main. With
    the default members that is SmolLM2-135M-Instruct (index 1): Gemma-3-270m is a base
    model (its GGUF has no template). Set `main` to choose another.

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

    model_config = _MODEL_CONFIG

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

    def _default_main(self, ens: Ensemble) -> int | None:
        for i, member in enumerate(ens.members):
            if member.chat_template or getattr(member.tokenizer, "chat_template", None):
                return i
        return None

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
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
        choice = _normalise_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    # --- generation -----------------------------------------------------------------------

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Ensemble, GenerationConfig, list[dict[str, str]], _ToolMode | None]:
        view, config, _ = self._call_settings(stop, kwargs)
        conversation = to_engine_messages(messages)
        tools = kwargs.get("tools") or []
        choice = kwargs.get("tool_choice")
        mode = None
        if tools and choice != "none":
            mode = _ToolMode(tools, choice)
            conversation = _with_system(conversation, mode.instruction())
        return view, config, conversation, mode

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
        events = view.stream(conversation, config)
        try:
            for event in events:
                for chunk in builder.add(event):
                    if chunk.text and run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            events.close()  # type: ignore[attr-defined]

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """`_stream` for asyncio: the event loop stays free while the engine decodes."""
        view, config, conversation, mode = self._prepare(messages, stop, kwargs)
        builder = _ChunkBuilder(view.main.name, self.model_name, mode)
        events = view.astream(conversation, config)
        try:
            async for event in events:
                for chunk in builder.add(event):
                    if chunk.text and run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            await events.aclose()  # type: ignore[attr-defined]


def _chat_result(chunks: list[ChatGenerationChunk]) -> ChatResult:
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

    def __init__(self, main_name: str, model_name: str, mode: _ToolMode | None) -> None:
        self.main_name, self.model_name, self.mode = main_name, model_name, mode
        self.held: list[str] = []

    def add(self, event: StreamEvent) -> list[ChatGenerationChunk]:
        """The chunks for one event."""
        if event.finish_reason is None:
            if self.mode is not None:
                self.held.append(event.delta)
                return []
            return [ChatGenerationChunk(message=AIMessageChunk(content=event.delta))]
        out: list[ChatGenerationChunk] = []
        text = event.delta
        tool_chunks: list[dict[str, Any]] = []
        invalid: list[InvalidToolCall] = []
        if self.mode is not None:
            content, calls, invalid = parse_tool_calls(
                "".join(self.held) + event.delta, self.mode.names, self.mode.forced
            )
            text = content
            tool_chunks = [
                {
                    "type": "tool_call_chunk",
                    "name": c["name"],
                    "args": json.dumps(c["args"]),
                    "id": c["id"],
                    "index": i,
                }
                for i, c in enumerate(calls)
            ]
        if text and self.mode is None:
            out.append(ChatGenerationChunk(message=AIMessageChunk(content=text)))
            text = ""
        usage = event.usage
        input_tokens = _input_tokens(usage, self.main_name)
        output_tokens = usage.completion_tokens if usage is not None else 0
        last = AIMessageChunk(
            content=text,  # with tools bound, the whole reply comes in this one chunk
            tool_call_chunks=tool_chunks,  # type: ignore[arg-type]
            usage_metadata={
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
            response_metadata={
                "model_name": self.model_name,
                "model_provider": PROVIDER,
                "finish_reason": event.finish_reason,
                "usage": _usage_dict(usage),
            },
            chunk_position="last",
        )
        if invalid:
            # Set after construction, as the parser decided (the chunk validator would
            # re-parse them from tool_call_chunks); with tools bound this is the only chunk.
            last.invalid_tool_calls = list(invalid)
        out.append(ChatGenerationChunk(message=last))
        return out


# --- messages and tools ---------------------------------------------------------------------


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's chat conversation ({"role", "content"} dicts).

    AI tool calls are written as the JSON objects `TOOL_INSTRUCTION` asks for; tool results
    become user turns `Tool <name> returned: <content>`.
    """
    out: list[dict[str, str]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        text = message.text if isinstance(message.text, str) else str(message.text)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            calls = []
            for call in message.tool_calls:
                call_names[call.get("id") or ""] = call["name"]
                calls.append(json.dumps({"name": call["name"], "arguments": call["args"]}))
            content = "\n".join([text, *calls]) if text else "\n".join(calls)
            out.append({"role": "assistant", "content": content})
        elif isinstance(message, (ToolMessage, FunctionMessage)):
            call_id = getattr(message, "tool_call_id", "")
            name = message.name or call_names.get(call_id) or "tool"
            out.append({"role": "user", "content": f"Tool {name} returned: {text}"})
        elif isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant", "model": "assistant"}.get(
                message.role, message.role
            )
            out.append(
                {"role": role if role in ("system", "assistant") else "user", "content": text}
            )
        else:
            raise ValueError(
                f"messages[{i}] is a {type(message).__name__}, which ChatDeepEn cannot send; "
                "use system, human, AI, tool or chat messages."
            )
    return out


def _with_system(conversation: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]["content"]
        merged = f"{first}\n\n{instruction}" if first else instruction
        return [{"role": "system", "content": merged}, *conversation[1:]]
    return [{"role": "system", "content": instruction}, *conversation]


def _normalise_tool_choice(choice: Any, names: list[str]) -> str | None:
    """The normalised choice: "auto", "any", "none" or a tool name."""
    if choice is None or choice == "auto" or choice is False:
        return "auto"
    if choice in ("any", "required") or choice is True:
        return names[0] if (choice is True and len(names) == 1) else "any"
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


class _ToolMode:
    """The tools bound to one call and what `tool_choice` asks for."""

    def __init__(self, tools: list[dict[str, Any]], choice: str | None) -> None:
        self.tools = [t.get("function", t) for t in tools]
        self.names = [t["name"] for t in self.tools]
        self.choice = choice or "auto"
        self.forced = self.choice != "auto"

    def instruction(self) -> str:
        """The system instruction describing the tools (`TOOL_INSTRUCTION`)."""
        lines = [
            json.dumps(
                {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t.get("parameters", {}),
                }
            )
            for t in self.tools
        ]
        choice = _CHOICE_TEXT.get(self.choice) or f"You must call the tool {self.choice}."
        return TOOL_INSTRUCTION.format(tools="\n".join(lines), choice=choice)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_tool_calls(
    text: str, names: Sequence[str], forced: bool = False
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Parse a reply into (content, tool_calls, invalid_tool_calls); never raises.

    A reply is a tool call when it is (optionally in a ``` fence) a JSON object, or, when
    `forced`, when it contains one anywhere. `{"name": ..., "arguments": {...}}` is the
    asked-for form (`"args"`/`"parameters"` are accepted for `"arguments"`, and a JSON
    string of arguments is decoded). An object without `"name"` is taken as the arguments
    when exactly one tool is bound. Malformed JSON, an unknown tool name or arguments that
    are not an object give an invalid tool call with the reason in `error`. Text before
    the object stays in `content`.
    """
    stripped = _FENCE.sub("", text.strip()).strip()
    start = 0 if stripped.startswith("{") else (stripped.find("{") if forced else -1)
    if start < 0:
        return text, [], []
    prefix, body = stripped[:start].strip(), stripped[start:]
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as exc:
        error = f"The reply is not valid JSON: {exc}"
        return (
            prefix,
            [],
            [
                InvalidToolCall(
                    name=None, args=body, id=call_id, error=error, type="invalid_tool_call"
                )
            ],
        )
    if not isinstance(obj, dict):
        return text, [], []
    if "name" not in obj and len(names) == 1:
        obj = {"name": names[0], "arguments": obj}
    name = obj.get("name")
    args: Any = obj.get("arguments", obj.get("args", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    error = None
    if not isinstance(name, str) or name not in names:
        error = f"{name!r} is not one of the tools {list(names)}"
    elif not isinstance(args, dict):
        error = f"the arguments must be a JSON object, got {args!r}"
    if error is not None:
        return (
            prefix,
            [],
            [
                InvalidToolCall(
                    name=name if isinstance(name, str) else None,
                    args=json.dumps(obj),
                    id=call_id,
                    error=error,
                    type="invalid_tool_call",
                )
            ],
        )
    return prefix, [ToolCall(name=name, args=args, id=call_id, type="tool_call")], []
