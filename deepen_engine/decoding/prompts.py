"""A row's prompt in one member's tokens: checked for emptiness, and against (or cut to)
the member's context window.
"""

from __future__ import annotations

from ..config import GenerationConfig
from ..errors import ConfigError
from ..members import Member

MemberPrompt = tuple[str, bool]  # (prompt text, add the tokenizer's special tokens)


def fit_context(
    ids: list[int], text: str, member: Member, row: int, config: GenerationConfig
) -> list[int]:
    """Row `row`'s prompt ids for one member (`text` is the prompt they encode).

    Empty ids raise `ConfigError`. `truncation="error"`: a prompt that fills the window
    raises `ConfigError`. `"left"`: the oldest ids are dropped so that prompt +
    `max_new_tokens` fits; a leading BOS token is kept, since models trained with one
    behave badly without it.
    """
    if not ids:
        raise ConfigError(
            f"Prompt {row} ({text!r}) is empty in member {member.name!r}'s tokens; give some text.",
            field="prompt",
        )
    window = member.context_window
    if window is None:
        return ids
    if config.truncation == "error":
        if len(ids) >= window:
            raise ConfigError(
                f"Prompt {row} is {len(ids)} tokens long in member {member.name!r}, whose "
                f"context holds {window}; shorten the prompt, or pass truncation='left' to "
                "drop its oldest tokens.",
                field="prompt",
            )
        return ids
    room = window - config.max_new_tokens
    if len(ids) <= room:
        return ids
    bos = member.tokenizer.bos_token_id
    head = ids[:1] if bos is not None and ids[0] == bos else []
    if room <= len(head):
        raise ConfigError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for prompt {row} in "
            f"member {member.name!r}, whose context holds {window}; lower max_new_tokens "
            f"below {window - len(head)}.",
            field="max_new_tokens",
        )
    return head + ids[len(ids) - (room - len(head)) :]
