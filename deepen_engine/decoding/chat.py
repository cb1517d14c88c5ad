"""Chat prompts: each member renders the conversation with its own chat template.

Generation then continues every member from its own rendered prompt with the shared
generated text. A member whose tokenizer has no template uses, in order:

1. the template given for it (`MemberSpec(chat_template=...)`, a Jinja string);
2. Gemma's turn format, if its vocabulary has `<start_of_turn>` (the Gemma-3-270m GGUF
   ships no template): `<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`,
   a system message prepended to the first user turn, as Gemma's own template does;
3. a plain-text transcript: `System: ...\\n\\nUser: ...\\n\\nAssistant:`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..config import check_text
from ..errors import ConfigError

ROLES = ("system", "user", "assistant")

# Special tokens that end an assistant turn, in the chat formats we know.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eom_id|>")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate one conversation: a non-empty list of {"role", "content"} dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts."
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"messages[{i}] must be a dict, got {type(message).__name__}.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f"messages[{i}] has role {role!r}; use one of {list(ROLES)}.")
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}] needs a 'content' string, got {content!r}.")
        check_text(content, f"messages[{i}]['content']")
        out.append({"role": role, "content": content})
    return out


def render(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    """The member's prompt text for `messages`, ending where the assistant's reply starts."""
    own = template or getattr(tokenizer, "chat_template", None)
    if own:
        return tokenizer.apply_chat_template(
            messages, chat_template=own, tokenize=False, add_generation_prompt=True
        )
    if "<start_of_turn>" in tokenizer.get_vocab():
        return _gemma_turns(tokenizer, messages)
    return _transcript(messages)


def _gemma_turns(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    parts = [tokenizer.bos_token or ""]
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system:
            content = "\n\n".join(system) + "\n\n" + content
        role = "model" if m["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _transcript(messages: list[dict[str, str]]) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"
