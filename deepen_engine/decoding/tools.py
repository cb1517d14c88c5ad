"""Tool calls on chat requests: the tools a request offers, how the members hear of them,
the grammar that makes a call always parse, and the reply parsed into `ToolCall`s.

Data flow of `Ensemble.generate(messages, tools=[...], tool_choice="auto")`::

    tools (OpenAI function specs) + tool_choice -> ToolSet (checked: names, schemas)
      -> chat.render, per member: its chat template with `tools=` where the template
         uses tools, else `ToolSet.instruction()` in the system turn (TOOL_INSTRUCTION)
      -> ToolSet.constraint(form): the main member's grammar (ConstraintSpec):
           "required" / one tool's name: the reply is one call,
               {"name": <tool>, "arguments": <that tool's schema>}
           "auto": a call as above, or text that does not start with the call's opening
      -> the decoding loop (constrained main member; helpers follow by text)
      -> tool_events: per row, text deltas until the reply shows it is a call (then held);
         on the final event the call is parsed: `tool_calls`, finish_reason "tool_calls"

A call's form (`CallForm`) follows the main member's template: Hermes-style templates
(Qwen2.5, Hermes, SmolLM3: the template names `<tool_call>`) wrap it in
`<tool_call>\\n...\\n</tool_call>`; others write the bare JSON object.
`tool_choice="none"`: no tools are described, nothing is constrained or parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..grammar import JSON_OPTIONS, ConstraintSpec, bound_numbers, check_constraint
from ..outputs import StreamEvent, ToolCall

TOOL_INSTRUCTION = (
    "You can call these tools (JSON schemas):\n{tools}\n\n"
    'To call a tool, reply with only a JSON object {{"name": "<tool name>", '
    '"arguments": {{...}}}} and nothing else. {choice}'
)
"""The system instruction for members whose chat template does not take tools (`{tools}`:
one `{"name", "description", "parameters"}` object a line; `{choice}`: `CHOICE_TEXT`)."""

CHOICE_TEXT = {
    "auto": "If no tool is needed, answer in plain text.",
    "required": "You must call one of the tools.",
}

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class CallForm:
    """How the main member writes a call: the JSON object between `prefix` and `suffix`."""

    prefix: str = ""
    suffix: str = ""

    @classmethod
    def for_template(cls, template: str | None) -> CallForm:
        """Hermes-style (`<tool_call>` in the template) or the bare JSON object."""
        if template and "<tool_call>" in template:
            return cls(prefix="<tool_call>\n", suffix="\n</tool_call>")
        return cls()

    @property
    def opening(self) -> str:
        """The text a call starts with."""
        return self.prefix or "{"


@dataclass(frozen=True)
class ToolSet:
    """A request's tools (`{"name", "description", "parameters"}`) and its choice:
    `"auto"`, `"required"`, or a tool's name.
    """

    tools: tuple[dict[str, Any], ...]
    choice: str

    @classmethod
    def build(cls, tools: Any, tool_choice: Any = None) -> ToolSet | None:
        """Check `tools` (OpenAI `{"type": "function", "function": {...}}` dicts, or the
        inner dicts) and `tool_choice` (None / `"auto"`, `"none"`, `"required"`, a name, or
        `{"type": "function", "function": {"name": ...}}`). None for no tools or "none".
        """
        if tools is None or (isinstance(tools, Sequence) and not tools):
            if tool_choice not in (None, "auto", "none"):
                raise ConfigError(
                    f"tool_choice={tool_choice!r} needs tools; give tools=[...].",
                    field="tool_choice",
                )
            return None
        if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
            raise ConfigError(
                f"tools must be a list of function specs, got {tools!r}.", field="tools"
            )
        specs = tuple(_tool_spec(i, t) for i, t in enumerate(tools))
        names = [t["name"] for t in specs]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(
                    f"tools has two tools named {name!r}; give each a new name.", field="tools"
                )
        choice = _choice(tool_choice, names)
        return None if choice == "none" else cls(specs, choice)

    @property
    def names(self) -> list[str]:
        """The tools' names, in order."""
        return [t["name"] for t in self.tools]

    def instruction(self) -> str:
        """The system instruction describing the tools (`TOOL_INSTRUCTION`)."""
        lines = [json.dumps(t, ensure_ascii=False) for t in self.tools]
        choice = CHOICE_TEXT.get(self.choice) or f"You must call the tool {self.choice}."
        return TOOL_INSTRUCTION.format(tools="\n".join(lines), choice=choice)

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (`{"type": "function", "function": ...}`)."""
        return [{"type": "function", "function": dict(t)} for t in self.tools]

    def constraint(self, form: CallForm) -> ConstraintSpec:
        """The main member's grammar: one call (forced choices), or a call or text (auto)."""
        allowed = [t for t in self.tools if self.choice in ("auto", "required", t["name"])]
        calls = [_call_schema(t) for t in allowed]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {**bound_numbers(schema), "x-guidance": JSON_OPTIONS}
        parts = [json.dumps(form.prefix)] if form.prefix else []
        parts.append(f"%json {json.dumps(schema)}")
        parts += [json.dumps(form.suffix)] if form.suffix else []
        call = " ".join(parts)
        if self.choice == "auto":
            first = re.escape(form.opening[0])
            lark = f"start: call | TEXT\ncall: {call}\nTEXT: /\\s*[^{first}\\s][\\s\\S]*/\n"
        else:
            lark = f"start: call\ncall: {call}\n"
        spec = check_constraint("grammar", lark)
        return ConstraintSpec(grammar=spec.grammar, source="tools")

    def parse(self, text: str, form: CallForm) -> ToolCall | None:
        """The call a whole reply makes, or None for a text reply (or a malformed call)."""
        body = text.strip()
        if form.prefix:
            if not (body.startswith(form.prefix.strip()) and body.endswith(form.suffix.strip())):
                return None
            body = body[len(form.prefix.strip()) : len(body) - len(form.suffix.strip())]
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        arguments = obj.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=obj["name"], arguments=arguments)


def _tool_spec(i: int, tool: Any) -> dict[str, Any]:
    """tools[i] as `{"name", "description", "parameters"}`; ConfigError if malformed."""
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        tool = tool["function"]
    if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
        raise ConfigError(
            f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
            f"'parameters': {{...}}}}}}, got {tool!r}.",
            field="tools",
        )
    name = tool["name"]
    if not _NAME.match(name):
        raise ConfigError(
            f"tools[{i}] has name {name!r}; use 1-64 letters, digits, '_', '.' or '-'.",
            field="tools",
        )
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ConfigError(
            f"tools[{i}] ({name!r}) parameters must be a JSON schema of an object, got "
            f"{parameters!r}.",
            field="tools",
        )
    try:
        check_constraint("json_schema", dict(parameters))
    except ValueError as exc:
        raise ConfigError(f"tools[{i}] ({name!r}) parameters: {exc}.", field="tools") from None
    return {
        "name": name,
        "description": str(tool.get("description") or ""),
        "parameters": dict(parameters),
    }


def _choice(choice: Any, names: list[str]) -> str:
    """`tool_choice` as "auto", "none", "required" or a tool name."""
    if choice is None or choice == "auto":
        return "auto"
    if choice in ("none", "required"):
        return str(choice)
    if isinstance(choice, Mapping):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    raise ConfigError(
        f"tool_choice={choice!r} is not 'auto', 'none', 'required' or one of the tools {names}.",
        field="tool_choice",
    )


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: `{"name": <const>, "arguments": <params>}`."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool["name"]},
            "arguments": closed(tool["parameters"]),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its
    properties and says nothing of others: a call names only the arguments its tool
    declares (OpenAI's strict mode does the same).
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# --- the reply ----------------------------------------------------------------------------


class _RowReply:
    """One row's reply: text deltas pass until the reply shows it is a call."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.call: bool | None = None  # None: not decided yet

    def add(self, delta: str, opening: str) -> str:
        """The part of the reply now known to be text."""
        self.text += delta
        if self.call is None:
            head = self.text.lstrip()
            if not head or opening.startswith(head[: len(opening)]) and len(head) < len(opening):
                return ""  # could still become a call
            self.call = head.startswith(opening)
        if self.call:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def tool_events(
    events: Generator[StreamEvent, None, None], tools: ToolSet, form: CallForm
) -> Generator[StreamEvent, None, None]:
    """The request's events with each row's tool call parsed (see the module docstring).

    Closing this generator closes `events` (which frees the request's rows).
    """
    rows: dict[int, _RowReply] = {}
    try:
        for event in events:
            out = _reply_event(rows.setdefault(event.index, _RowReply()), event, tools, form)
            if out is not None:
                yield out
    finally:
        events.close()


async def atool_events(
    events: AsyncGenerator[StreamEvent, None], tools: ToolSet, form: CallForm
) -> AsyncGenerator[StreamEvent, None]:
    """`tool_events` for an async stream."""
    rows: dict[int, _RowReply] = {}
    try:
        async for event in events:
            out = _reply_event(rows.setdefault(event.index, _RowReply()), event, tools, form)
            if out is not None:
                yield out
    finally:
        await events.aclose()


def _reply_event(
    row: _RowReply, event: StreamEvent, tools: ToolSet, form: CallForm
) -> StreamEvent | None:
    """One engine event as the caller sees it with tools: text, the parsed call, or
    nothing (text held back while the reply may still become a call).
    """
    delta = row.add(event.delta, form.opening)
    if event.finish_reason is None:
        return StreamEvent(delta=delta, index=event.index) if delta else None
    call = tools.parse(row.text, form) if row.call is not False else None
    if call is None:  # a text reply, or a call cut short (length) or malformed (no grammar)
        return StreamEvent(
            delta=row.text[row.sent :],
            index=event.index,
            finish_reason=event.finish_reason,
            usage=event.usage,
            token_ids=event.token_ids,
        )
    return StreamEvent(
        index=event.index,
        finish_reason="tool_calls",
        usage=event.usage,
        token_ids=event.token_ids,
        tool_calls=[call],
    )
