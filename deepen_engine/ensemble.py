"""`Ensemble`: load members, align their vocabularies, and generate fused text.

from deepen_engine import Ensemble
ens = Ensemble(["smollm2-135m-instruct", "gemma-3-270m"], main=1)
print(ens.generate("The capital of France is", max_new_tokens=8).text)
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, overload

import torch

from .alignment.vocabulary import Anchors, find_anchors
from .config import FusionConfig, GenerationConfig, SchedulerConfig, check_text
from .decoding.chat import check_messages, render
from .decoding.prompts import MemberPrompt
from .decoding.readers import aread, read
from .decoding.rows import NewRow
from .decoding.scheduler import Request, Scheduler, Sink
from .decoding.tools import CallForm, ToolSet, atool_events, tool_events
from .errors import ConfigError
from .fusion import Fuser
from .grammar import ConstraintSpec
from .members import (
    DEFAULT_MEMBERS,
    Member,
    MemberSpec,
    as_spec,
    display_name,
    source_key,
)
from .outputs import GenerationResult, Progress, StreamEvent, collect
from .remote import load_members

Conversation = list[dict[str, Any]]  # chat messages: [{"role": ..., "content": ...}, ...]
Prompt = str | Conversation  # a text, or a chat conversation


@dataclass
class _Call:
    """One checked request: each row's member prompts and what decodes them."""

    rows: list[list[MemberPrompt]]
    config: GenerationConfig
    batch_size: int | None
    tools: ToolSet | None = None  # the request's tools (None: none, or tool_choice "none")
    form: CallForm = field(default_factory=CallForm)  # how the main member writes a call
    constraint: ConstraintSpec | None = None  # the tools' grammar, if constrained


class Ensemble:
    """A token-level ensemble of causal LMs with different vocabularies (DeePEn).

    Args:
        members: what to load, in order: embedded names, `.gguf` files, model folders, hub
            ids, `(model, tokenizer)` pairs or `MemberSpec`s. Default: the two embedded
            members (SmolLM2-135M-Instruct, Gemma-3-270m).
        fusion: fusion settings; keyword arguments (`main=1`, `eta=0.15`, ...) override
            its fields.
        scheduler: how concurrent requests share the members (largest batch, longest
            queue); see `SchedulerConfig`.
    """

    def __init__(
        self,
        members: Sequence[Any] = DEFAULT_MEMBERS,
        fusion: FusionConfig | None = None,
        *,
        scheduler: SchedulerConfig | None = None,
        **fusion_overrides: Any,
    ) -> None:
        if isinstance(members, (str, MemberSpec)) or _is_pair(members):
            members = [members]
        if not members:
            raise ConfigError("members is empty; give at least one model.")
        base = fusion or FusionConfig()
        self.fusion = FusionConfig(**{**base.model_dump(), **fusion_overrides})
        specs = [as_spec(m) for m in members]
        self.fusion.check_members(len(specs))
        _check_distinct(specs)  # before loading: a mistake should cost no load time
        self.members: list[Member] = load_members(specs)
        # one worker thread owns the members; views from with_fusion share it
        self._scheduler = Scheduler(self.members, scheduler or SchedulerConfig())
        start = time.perf_counter()
        self.anchors: Anchors | None = None
        if len(self.members) > 1:
            self.anchors = find_anchors(
                [m.vocab for m in self.members],
                [m.name for m in self.members],
                self.fusion.min_anchors,
            )
        self.fuser = Fuser.build(self.members, self.anchors, self.fusion)
        self.align_seconds = time.perf_counter() - start

    def with_fusion(self, **changes: Any) -> Ensemble:
        """A view of this ensemble with other fusion settings, sharing the loaded members.

        E.g. `ens.with_fusion(main=1)` or `ens.with_fusion(eta=0)` (the main member alone).
        """
        fusion = FusionConfig(**{**self.fusion.model_dump(), **changes})
        fusion.check_members(len(self.members))
        if fusion.min_anchors > len(self.anchors or []) and len(self.members) > 1:
            raise ConfigError(
                f"FusionConfig.min_anchors={fusion.min_anchors} exceeds the "
                f"{len(self.anchors or [])} anchors these members share."
            )
        view = copy.copy(self)
        view.fusion = fusion
        view.fuser = self.fuser.with_config(fusion)
        return view

    @property
    def main(self) -> Member:
        """The member whose vocabulary the fused tokens come from."""
        return self.members[self.fusion.main]

    def default_chat_main(self) -> int:
        """The main member for chat when the user chose none: the first member with a chat
        template of its own (its tokenizer's, or `MemberSpec.chat_template`), else
        `fusion.main`.

        A member without a template is most often a base model that does not follow a
        conversation (the Gemma-3-270m GGUF); with the default members this picks
        SmolLM2-135M-Instruct (index 1). Every entry point (adapters, CLI) uses this rule.
        """
        for i, member in enumerate(self.members):
            if member.chat_template or getattr(member.tokenizer, "chat_template", None):
                return i
        return self.fusion.main

    def stream(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        tool_constraint: bool = True,
        progress: Callable[[Progress], None] | None = None,
        **overrides: Any,
    ) -> Generator[StreamEvent, None, None]:
        """Yield text deltas as they become final, and one final event per prompt.

        `prompt` is one prompt or a list; a prompt is a text, or a chat conversation (a
        list of `{"role", "content"}` dicts) that each member renders with its own chat
        template. Events carry the prompt's position as `index`. At most `batch_size` of
        the request's prompts run at once (default: all). Requests from other threads and
        tasks share the members' forward passes (continuous batching, see
        `SchedulerConfig`); each row gives exactly the text it gives alone (greedy, or
        sampled with a seed). Closing the stream removes its rows after the current step
        and frees their cache rows before `close()` returns.

        Tools (chat prompts only): `tools` is a list of OpenAI function specs
        (`{"type": "function", "function": {"name", "description", "parameters"}}`),
        `tool_choice` is `"auto"` (default: text or a call), `"required"` (a call),
        `"none"` (no tools) or a tool's name (a call of that tool). The main member's
        decoding is constrained so a call always parses and its arguments match the tool's
        schema (`tool_constraint=False` decodes freely and only parses: for measuring).
        A reply that calls a tool ends with `finish_reason="tool_calls"` and
        `StreamEvent.tool_calls`; its text is not streamed. See decoding/tools.py.

        `progress`, if given, is called in the reading thread with a `Progress` as each
        member reads the prompts (in chunks of `SchedulerConfig.prefill_chunk` positions)
        and after each step, for progress bars.
        """
        call = self._request(prompt, config, batch_size, overrides, tools, tool_choice)
        events = read(self._scheduler, self._submitter(call, tool_constraint, progress), progress)
        return events if call.tools is None else tool_events(events, call.tools, call.form)

    def astream(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        tool_constraint: bool = True,
        progress: Callable[[Progress], None] | None = None,
        **overrides: Any,
    ) -> AsyncGenerator[StreamEvent, None]:
        """`stream` for asyncio: decoding runs in the ensemble's worker thread, the event
        loop stays free.

        Closing the iterator or cancelling the task that reads it removes the request's
        rows after the current step; a request still waiting to start never starts.
        `progress` as in `stream`, called on the event loop.
        """
        call = self._request(prompt, config, batch_size, overrides, tools, tool_choice)
        events = aread(self._scheduler, self._submitter(call, tool_constraint, progress), progress)
        return events if call.tools is None else atool_events(events, call.tools, call.form)

    def _submitter(
        self, call: _Call, tool_constraint: bool, progress: Callable[[Progress], None] | None
    ) -> Callable[[Sink], Request]:
        """What the reader calls to queue `call` (constrained unless `tool_constraint` is
        off; reporting progress when someone listens).
        """
        return partial(
            self._submit, call, tool_constraint=tool_constraint, progress=progress is not None
        )

    def _submit(
        self, call: _Call, sink: Sink, tool_constraint: bool = True, progress: bool = False
    ) -> Request:
        """Queue a request for the scheduler (raises `QueueFullError` at once if full)."""
        cfg = call.config
        request = Request(
            rows=[],
            main=self.fusion.main,
            run_helpers=not self.fuser.is_identity,
            sink=sink,
            progress=progress,
            batch_size=call.batch_size,
            deadline=None if cfg.timeout is None else time.monotonic() + cfg.timeout,
        )
        constraint = call.constraint if tool_constraint else None
        request.rows = [
            NewRow(p, cfg, self.fuser, index=i, owner=request, constraint=constraint)
            for i, p in enumerate(call.rows)
        ]
        self._scheduler.submit(request)
        return request

    def close(self) -> None:
        """Stop the worker thread (requests still running fail) and the members' Ray
        actors, if any. Views share both.
        """
        self._scheduler.close()
        for member in self.members:
            if member.remote is not None:
                member.remote.close()

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The limits of the scheduler shared by this ensemble and its views."""
        return self._scheduler.config

    def queue_state(self) -> dict[str, int]:
        """Rows decoding now and requests waiting to start (shared by all views)."""
        return {
            "running_rows": self._scheduler.running_rows,
            "waiting_requests": self._scheduler.waiting_requests,
        }

    @overload
    async def agenerate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> GenerationResult: ...

    @overload
    async def agenerate(
        self,
        prompt: Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]: ...

    async def agenerate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """`generate` for asyncio (see `astream`)."""
        stream = self.astream(prompt, config, batch_size=batch_size, **overrides)
        events = [e async for e in stream]
        results = collect(iter(events), len(check_prompts(prompt)))
        return results[0] if _is_single(prompt) else results

    def _request(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None,
        batch_size: int | None,
        overrides: dict[str, Any],
        tools: Any = None,
        tool_choice: Any = None,
    ) -> _Call:
        """Check a request and render its prompts."""
        cfg = _generation_config(config, overrides)
        prompts = check_prompts(prompt)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        toolset = ToolSet.build(tools, tool_choice)
        if toolset is None:
            return _Call([self._member_prompts(p) for p in prompts], cfg, batch_size)
        if any(isinstance(p, str) for p in prompts):
            raise ConfigError("tools need chat prompts (lists of messages), not plain text.")
        if cfg.constraint is not None:
            raise ConfigError(
                f"give tools or GenerationConfig.{cfg.constraint[0]}, not both: the tools "
                "already constrain the reply."
            )
        main = self.main
        form = CallForm.for_template(main.chat_template or main.tokenizer.chat_template)
        rows = [self._member_prompts(p, toolset) for p in prompts]
        return _Call(rows, cfg, batch_size, toolset, form, toolset.constraint(form))

    def render(
        self, messages: Conversation, tools: Any = None, tool_choice: Any = None
    ) -> list[str]:
        """Each member's prompt text for a chat conversation, with the tools described as
        `stream` would (see decoding/chat.py).
        """
        return self._render(messages, ToolSet.build(tools, tool_choice))

    def _render(self, messages: Conversation, tools: ToolSet | None) -> list[str]:
        messages = check_messages(messages)
        return [render(m.tokenizer, messages, m.chat_template, tools) for m in self.members]

    def _member_prompts(self, prompt: Prompt, tools: ToolSet | None = None) -> list[MemberPrompt]:
        if isinstance(prompt, str):
            return [(prompt, True) for _ in self.members]
        # Rendered chat prompts already hold their special tokens (BOS, turn markers).
        return [(text, False) for text in self._render(prompt, tools)]

    @overload
    def generate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (one result) or a list (a list of results, in order).

        A prompt is a text or a chat conversation; see `stream`.

        Settings as a `GenerationConfig` or as keywords (`max_new_tokens=`, `stop=`,
        `temperature=`, `top_p=`, `top_k=`, `seed=`, and an output constraint:
        `json_schema=`, `regex=` or `grammar=`). Chat prompts also take `tools=`,
        `tool_choice=` and `tool_constraint=` (see `stream`); a result that calls a tool
        has `tool_calls` and `finish_reason == "tool_calls"`.
        """
        events = self.stream(prompt, config, batch_size=batch_size, **overrides)
        results = collect(events, len(check_prompts(prompt)))
        return results[0] if _is_single(prompt) else results


def _is_single(prompt: Any) -> bool:
    """One text, or one conversation (a list of message dicts)."""
    return isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], Mapping)
    )


def check_prompts(prompt: Any) -> list[Prompt]:
    """The prompts of a request as a list, each checked (`ConfigError` naming the first
    bad one): a non-empty str of valid Unicode text, or a chat conversation.

    Needs no member: callers that load members later (the command line) check first, so
    a mistake costs no load time.
    """
    prompts = [prompt] if _is_single(prompt) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError(
            "prompt must be a str, a chat conversation (a list of message dicts), or a "
            f"non-empty list of those; got {type(prompt).__name__}."
        )
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                # Members disagree on what an empty prompt means (one adds a BOS token, one
                # has no token at all), so it is refused for all of them alike.
                raise ConfigError(
                    f"prompt at position {i} is an empty string; give some text to continue "
                    "(or a chat conversation)."
                )
            out.append(check_text(p, f"prompt at position {i}"))
        elif isinstance(p, (list, tuple)):
            out.append(check_messages(p))
        else:
            raise ConfigError(
                f"prompt must be a str or a chat conversation, got {type(p).__name__} "
                f"at position {i}."
            )
    return out


def _check_distinct(specs: Sequence[MemberSpec]) -> None:
    """Refuse the same model twice, or two members with one display name.

    Fusing a model with itself only reweights it (that is what `weights` is for), and
    usage is reported by member name, so names must tell members apart.
    """
    sources: dict[Any, int] = {}
    names: dict[str, int] = {}
    for i, spec in enumerate(specs):
        key = source_key(spec)
        if key in sources:
            j = sources[key]
            raise ConfigError(
                f"members[{j}] and members[{i}] are the same model ({display_name(spec)!r}); "
                "fusing a model with itself only reweights it. Give each model once and use "
                "FusionConfig.weights (e.g. weights=[2, 1]) to weigh one member more."
            )
        sources[key] = i
        name = display_name(spec)
        if name in names:
            raise ConfigError(
                f"members[{names[name]}] and members[{i}] are both named {name!r}; give them "
                "distinct names with MemberSpec(source=..., name=...)."
            )
        names[name] = i


def _is_pair(item: Any) -> bool:
    """A single `(model, tokenizer)` pair rather than a sequence of members."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.nn.Module)


def _generation_config(
    config: GenerationConfig | None, overrides: dict[str, Any]
) -> GenerationConfig:
    base = config or GenerationConfig()
    if not overrides:
        return base
    return GenerationConfig(**{**base.model_dump(), **overrides})
