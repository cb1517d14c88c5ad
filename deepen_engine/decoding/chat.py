"""Chat prompts: each member renders the conversation with its own chat template.

Generation then continues every member from its own rendered prompt with the shared
generated text. A member whose tokenizer has no template uses, in order:

1. the template given for it (`MemberSpec(chat_template=...)`, a Jinja string);
2. Gemma's turn format, if its vocabulary has `<start_of_turn>` (the Gemma-3-270m GGUF
   ships no template): `<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`,
   a system message prepended to the first user turn, as Gemma's own template does;
3. a plain-text transcript: `System: ...\\n\\nUser: ...\\n\\nAssistant:`.

Tools (decoding/tools.py): a template that uses `tools` gets them (and the conversation's
tool calls and `tool` messages as they are); for any other, the tools are described in
the system turn (`ToolSet.instruction`) and a tool result becomes a user turn
`(The tool <name> was called with <arguments> and returned: <content>)` (see
`plain_messages`). A conversation that ends with an assistant message is
continued: the reply extends that message (an assistant prefix), its turn is not closed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..text_checks import check_text

if TYPE_CHECKING:  # tools.py imports the grammar layer; chat only needs its type
    from .tools import ToolSet

ROLES = ("system", "user", "assistant", "tool")


Message = dict[str, Any]


def check_messages(messages: Any) -> list[Message]:
    """Validate one conversation: a non-empty list of OpenAI-style message dicts.

    `{"role": "system" | "user", "content": str}`; `{"role": "assistant", "content": str
    or None, "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}`
    (arguments a dict or a JSON string); `{"role": "tool", "content": str, "tool_call_id":
    ..., "name": ...}`. Returned normalised: content a str, arguments a dict.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts.",
            field="messages",
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(
                f"messages[{i}] must be a dict, got {type(message).__name__}.", field="messages"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(
                f"messages[{i}] has role {role!r}; use one of {list(ROLES)}.", field="messages"
            )
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ConfigError(
                f"messages[{i}] needs a 'content' string, got {content!r}.", field="messages"
            )
        check_text(content, f"messages[{i}]['content']")
        item: Message = {"role": role, "content": content}
        if calls:
            item["tool_calls"] = [_check_call(i, j, c) for j, c in enumerate(calls)]
        if role == "tool":
            item["tool_call_id"] = message.get("tool_call_id")
            item["name"] = message.get("name")
        out.append(item)
    return out


def _check_call(i: int, j: int, call: Any) -> Message:
    """messages[i].tool_calls[j] as `{"id", "type": "function", "function": {"name",
    "arguments": dict}}`.
    """
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ConfigError(
            f"messages[{i}].tool_calls[{j}] must be {{'id': ..., 'type': 'function', "
            f"'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}.",
            field="messages",
        )
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ConfigError(
                f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {arguments!r}.",
                field="messages",
            ) from None
    if not isinstance(arguments, dict):
        raise ConfigError(
            f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, got "
            f"{arguments!r}.",
            field="messages",
        )
    return {
        "id": call.get("id") or f"call_{j}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def render(
    tokenizer: Any,
    messages: list[Message],
    template: str | None = None,
    tools: ToolSet | None = None,
) -> str:
    """The member's prompt text for `messages`, ending where the assistant's reply starts
    (inside the last message when it is the assistant's).
    """
    own = template or getattr(tokenizer, "chat_template", None)
    go_on = messages[-1]["role"] == "assistant"
    if own and "tools" in own:  # the template takes tools, tool calls and tool results
        return str(
            tokenizer.apply_chat_template(
                messages,
                tools=tools.template_tools() if tools is not None else None,
                chat_template=own,
                tokenize=False,
                add_generation_prompt=not go_on,
                continue_final_message=go_on,
            )
        )
    plain = plain_messages(messages)
    if tools is not None:
        plain = with_system(plain, tools.instruction())
    if own:
        return str(
            tokenizer.apply_chat_template(
                plain,
                chat_template=own,
                tokenize=False,
                add_generation_prompt=not go_on,
                continue_final_message=go_on,
            )
        )
    if _has_token(tokenizer, "<start_of_turn>"):
        return _gemma_turns(tokenizer, plain, go_on)
    return _transcript(plain, go_on)


def plain_messages(messages: list[Message]) -> list[dict[str, str]]:
    """The conversation for a template without tools: each tool result becomes a user turn
    `(The tool <name> was called with <arguments> and returned: <content>)`, and the call
    it answers leaves the assistant's turn (an assistant turn left empty is dropped); a
    call without a result stays in its turn as the JSON object the assistant replies with.

    (Small models shown their own earlier call as an assistant turn tend to repeat it
    instead of answering from the result; stated in the user's turn, they answer.)
    """
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    calls: dict[str, dict[str, Any]] = {}  # tool call id -> its function, until answered
    out = []
    for m in messages:
        content = m["content"]
        if m["role"] == "tool":
            call = calls.get(m.get("tool_call_id") or "")
            name = m.get("name") or (call["name"] if call else "tool")
            args = f" was called with {json.dumps(call['arguments'])} and" if call else ""
            out.append({"role": "user", "content": f"(The tool {name}{args} returned: {content})"})
            continue
        shown = []
        for c in m.get("tool_calls") or []:
            if c["id"] in answered:
                calls[c["id"]] = c["function"]
            else:
                fn = c["function"]
                shown.append(json.dumps({"name": fn["name"], "arguments": fn["arguments"]}))
        text = "\n".join([content, *shown]) if content else "\n".join(shown)
        if text or not m.get("tool_calls"):
            out.append({"role": m["role"], "content": text})
    return out


def with_system(conversation: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """The conversation with `instruction` appended to its first system turn (or as one)."""
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]["content"]
        merged = f"{first}\n\n{instruction}" if first else instruction
        return [{"role": "system", "content": merged}, *conversation[1:]]
    return [{"role": "system", "content": instruction}, *conversation]


def _has_token(tokenizer: Any, token: str) -> bool:
    """Whether `token` is one of the tokenizer's tokens: one lookup in the Rust tokenizer
    (`get_vocab()` builds a dict of every token, 262k for Gemma-3, on every render).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(token) is not None
    return token in tokenizer.get_vocab()


def _gemma_turns(tokenizer: Any, messages: list[dict[str, str]], go_on: bool) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    parts = [tokenizer.bos_token or ""]
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system:
            content = "\n\n".join(system) + "\n\n" + content
        role = "model" if m["role"] == "assistant" else "user"
        if go_on and i == len(turns) - 1:
            parts.append(f"<start_of_turn>{role}\n{content}")  # continued: left open
            return "".join(parts)
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _transcript(messages: list[dict[str, str]], go_on: bool) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if go_on:
        return "\n\n".join(lines)
    return "\n\n".join(lines) + "\n\nAssistant:"
