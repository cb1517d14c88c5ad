"""Text the members can read: valid Unicode, checked before any model runs (prompts, stop
strings, messages).
"""

from __future__ import annotations

from .errors import ConfigError


def text_problem(text: str, what: str) -> str | None:
    """What is wrong with `text` as text for the members, or None if it is valid Unicode.

    A lone surrogate (U+D800-U+DFFF) is what Python makes of bytes that are not UTF-8 (a
    command-line argument in another encoding, `errors="surrogateescape"`); no tokenizer
    can encode it, so it is refused before any model runs, naming where it is.
    """
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return (
                f"{what} holds {ch!r} at character {i} (after {text[max(0, i - 20) : i]!r}), "
                "which is not valid Unicode text (most often bytes that are not UTF-8); give "
                "UTF-8 text"
            )
    return None


def check_text(text: str, what: str) -> str:
    """`text` unchanged, or `ConfigError` if it is not valid Unicode text (`text_problem`)."""
    problem = text_problem(text, what)
    if problem is not None:
        raise ConfigError(problem + ".")
    return text
