"""A request checked before it reaches the scheduler: its prompts (texts or chat
conversations, each checked), its generation settings, each member's prompt text (chat
rendered with the member's own template, tools described), and the tools' constraint.

Nothing here needs a loaded member except the rendering, so the command line checks
prompts (`check_prompts`) before it loads anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import GenerationConfig
from .decoding.chat import check_messages, render
from .decoding.prompts import MemberPrompt
from .decoding.tools import CallForm, ToolSet
from .errors import ConfigError
from .grammar import ConstraintSpec
from .members import Member, MemberSpec, display_name, source_key
from .text_checks import check_text

Conversation = list[dict[str, Any]]  # chat messages: [{"role": ..., "content": ...}, ...]
Prompt = str | Conversation  # a text, or a chat conversation


@dataclass
class CheckedRequest:
    """One checked request: each row's member prompts and what decodes them."""

    rows: list[list[MemberPrompt]]
    config: GenerationConfig
    batch_size: int | None
    tools: ToolSet | None = None  # the request's tools (None: none, or tool_choice "none")
    form: CallForm = field(default_factory=CallForm)  # how the main member writes a call
    constraint: ConstraintSpec | None = None  # the tools' grammar, if constrained


def check_request(
    members: Sequence[Member],
    main: Member,
    prompt: Prompt | Sequence[Prompt],
    config: GenerationConfig | None,
    batch_size: int | None,
    overrides: dict[str, Any],
    tools: Any = None,
    tool_choice: Any = None,
) -> CheckedRequest:
    """Check a request and render its prompts for every member (`main` writes the reply,
    so its chat template decides how a tool call is written).
    """
    cfg = generation_config(config, overrides)
    prompts = check_prompts(prompt)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    toolset = ToolSet.build(tools, tool_choice)
    if toolset is None:
        return CheckedRequest([member_prompts(members, p) for p in prompts], cfg, batch_size)
    if any(isinstance(p, str) for p in prompts):
        raise ConfigError("tools need chat prompts (lists of messages), not plain text.")
    if cfg.constraint is not None:
        raise ConfigError(
            f"give tools or GenerationConfig.{cfg.constraint[0]}, not both: the tools "
            "already constrain the reply."
        )
    form = CallForm.for_template(main.chat_template or main.tokenizer.chat_template)
    rows = [member_prompts(members, p, toolset) for p in prompts]
    return CheckedRequest(rows, cfg, batch_size, toolset, form, toolset.constraint(form))


def render_chat(
    members: Sequence[Member], messages: Conversation, tools: ToolSet | None
) -> list[str]:
    """Each member's prompt text for a chat conversation (its own template)."""
    messages = check_messages(messages)
    return [render(m.tokenizer, messages, m.chat_template, tools) for m in members]


def member_prompts(
    members: Sequence[Member], prompt: Prompt, tools: ToolSet | None = None
) -> list[MemberPrompt]:
    """Each member's prompt: a text as it is (tokenised with the member's special tokens),
    a conversation rendered (its special tokens already in the text).
    """
    if isinstance(prompt, str):
        return [(prompt, True) for _ in members]
    return [(text, False) for text in render_chat(members, prompt, tools)]


def is_single(prompt: Any) -> bool:
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
    prompts = [prompt] if is_single(prompt) else prompt
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


def check_distinct(specs: Sequence[MemberSpec]) -> None:
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


def is_pair(item: Any) -> bool:
    """A single `(model, tokenizer)` pair rather than a sequence of members."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.nn.Module)


def generation_config(
    config: GenerationConfig | None, overrides: dict[str, Any]
) -> GenerationConfig:
    """`config` (default: the defaults) with the call's keyword settings on top."""
    base = config or GenerationConfig()
    if not overrides:
        return base
    return GenerationConfig(**{**base.model_dump(), **overrides})
