"""`Ensemble`: load members, align their vocabularies, and generate fused text.

from deepen_engine import Ensemble
ens = Ensemble(["smollm2-135m-instruct", "gemma-3-270m"], main=1)
print(ens.generate("The capital of France is", max_new_tokens=8).text)
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from functools import partial
from typing import Any, overload

from .alignment.vocabulary import Anchors, find_anchors
from .config import FusionConfig, GenerationConfig, SchedulerConfig
from .decoding.rows import NewRow
from .decoding.tools import ToolSet, atool_events, tool_events
from .errors import ConfigError
from .fusion import Fuser
from .fusion.context import cache_view
from .members import (
    DEFAULT_MEMBERS,
    Member,
    MemberSpec,
    as_spec,
)
from .outputs import GenerationResult, Progress, StreamEvent, collect
from .readers import aread, read
from .remote import load_members
from .requests import (
    CheckedRequest,
    Conversation,
    Prompt,
    check_distinct,
    check_prompts,
    check_request,
    is_pair,
    is_single,
    render_chat,
)
from .scheduled_request import Request, Sink
from .scheduler import Scheduler

VIEW_CACHE = 32  # fusion views `Ensemble.view` keeps per ensemble


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
        if isinstance(members, (str, MemberSpec)) or is_pair(members):
            members = [members]
        if not members:
            raise ConfigError("members is empty; give at least one model.")
        base = fusion or FusionConfig()
        self.fusion = FusionConfig(**{**base.model_dump(), **fusion_overrides})
        specs = [as_spec(m) for m in members]
        self.fusion.check_members(len(specs))
        check_distinct(specs)  # before loading: a mistake should cost no load time
        self.members: list[Member] = load_members(specs)
        # one worker thread owns the members; views from with_fusion share it
        self._scheduler = Scheduler(self.members, scheduler or SchedulerConfig())
        self._views: dict[str, Ensemble] = {}  # `view`'s cache: changes -> view
        self._views_lock = threading.Lock()
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
        view._views, view._views_lock = {}, threading.Lock()  # keyed by changes to *its* fusion
        return view

    def view(
        self,
        request: Mapping[str, Any] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        chat: bool = False,
    ) -> Ensemble:
        """The ensemble with one request's fusion settings: the one place that decides
        their precedence (the server, the adapters and the commands all call it).

        `request` and `defaults` hold FusionConfig fields by name; `None` means unset. A
        request's value wins over `defaults` (a server's or an adapter's own settings),
        which win over this ensemble's. A chat request with no `main` anywhere is led by
        `default_chat_main()`. Views share the loaded members and are cached per distinct
        change (the last `VIEW_CACHE`).
        """
        wanted = {k: v for k, v in (defaults or {}).items() if v is not None}
        wanted.update({k: v for k, v in (request or {}).items() if v is not None})
        if chat and "main" not in wanted and self.fusion.main != "auto":
            wanted["main"] = self.default_chat_main()  # "auto" already picks a chat member
        changes = {k: v for k, v in wanted.items() if getattr(self.fusion, k) != v}
        if not changes:
            return self
        key = json.dumps(changes, sort_keys=True, default=str)
        with self._views_lock:
            view = self._views.get(key)
            if view is None:
                view = self.with_fusion(**changes)
                cache_view(self._views, key, view, VIEW_CACHE, self.fusion.tau)
        return view

    @property
    def main(self) -> Member:
        """The member whose vocabulary the fused tokens come from."""
        return self.members[self.fusion.leader]  # main="auto": each row's is in its usage

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
        return self.fusion.leader

    def tools_main(self) -> int:
        """The member that leads a request with tools: with `main="auto"`,
        `default_chat_main()` (the leader's chat template writes and parses the calls, so it
        is fixed before the prompt is read; with one chat member, as the default pair, that
        is the member auto picks), else the fixed main.
        """
        return self.default_chat_main() if self.fusion.main == "auto" else self.fusion.leader

    def _tools_leader(self) -> Ensemble:
        """The view that runs a request with tools under `main="auto"` (`tools_main`)."""
        return self.view({"main": self.tools_main()})

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
        if tools is not None and self.fusion.main == "auto":
            return self._tools_leader().stream(
                prompt, config, batch_size=batch_size, tools=tools, tool_choice=tool_choice,
                tool_constraint=tool_constraint, progress=progress, **overrides,
            )  # fmt: skip
        call = check_request(
            self.members, self.main, prompt, config, batch_size, overrides, tools, tool_choice
        )
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
        if tools is not None and self.fusion.main == "auto":
            return self._tools_leader().astream(
                prompt, config, batch_size=batch_size, tools=tools, tool_choice=tool_choice,
                tool_constraint=tool_constraint, progress=progress, **overrides,
            )  # fmt: skip
        call = check_request(
            self.members, self.main, prompt, config, batch_size, overrides, tools, tool_choice
        )
        events = aread(self._scheduler, self._submitter(call, tool_constraint, progress), progress)
        return events if call.tools is None else atool_events(events, call.tools, call.form)

    def _submitter(
        self,
        call: CheckedRequest,
        tool_constraint: bool,
        progress: Callable[[Progress], None] | None,
    ) -> Callable[[Sink], Request]:
        """What the reader calls to queue `call` (constrained unless `tool_constraint` is
        off; reporting progress when someone listens).
        """
        return partial(
            self._submit, call, tool_constraint=tool_constraint, progress=progress is not None
        )

    def _submit(
        self, call: CheckedRequest, sink: Sink, tool_constraint: bool = True, progress: bool = False
    ) -> Request:
        """Queue a request for the scheduler (raises `QueueFullError` at once if full)."""
        cfg = call.config
        auto = self.fusion.main == "auto"
        request = Request(
            rows=[],
            main=None if auto else self.fusion.leader,
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

    def reserve_row_caches(self) -> int:
        """Allocate the DeePEn relative-row caches (`row_cache_size` rows per member) in full
        now, not as tokens first appear; their bytes (0 for other methods). `deepen serve`
        calls it after loading, so its memory does not creep up as the caches fill.
        """
        return self.fuser.reserve_rows()

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The limits of the scheduler shared by this ensemble and its views."""
        return self._scheduler.config

    def queue_state(self) -> dict[str, int]:
        """Rows running, requests waiting, bytes of running rows' KV caches here (all views)."""
        s = self._scheduler
        return {"running_rows": s.running_rows, "waiting_requests": s.waiting_requests,
                "kv_cache_bytes": s.kv_cache_bytes}  # fmt: skip

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
        return results[0] if is_single(prompt) else results

    def render(
        self, messages: Conversation, tools: Any = None, tool_choice: Any = None
    ) -> list[str]:
        """Each member's prompt text for a chat conversation, with the tools described as
        `stream` would (see decoding/chat.py).
        """
        return render_chat(self.members, messages, ToolSet.build(tools, tool_choice))

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
        return results[0] if is_single(prompt) else results
