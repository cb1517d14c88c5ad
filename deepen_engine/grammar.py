"""Grammar text of an output constraint (a JSON schema, a regular expression or a Lark
grammar) through llguidance, checked when a `GenerationConfig` is made.

This module needs neither torch nor members, so the config can check a constraint without
importing the decoding code; decoding/constraints.py turns the grammar into masks.
The grammar library is llguidance (the `constraints` extra), imported on first use.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import ConfigError

INSTALL_HINT = "pip install -U 'deepen[constraints]' (or: pip install -U llguidance)"
MIN_LLGUIDANCE = (1, 7)  # the first release whose from_tokenizer takes a list of EOS ids

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options: the layout of Python's `json.dumps` (`", "` and `": "`, no
other whitespace), so a model cannot wander into endless spaces and newlines inside a
structure."""


def llguidance() -> ModuleType:
    """The llguidance module; `ConfigError` with the install command when it is missing."""
    try:
        import llguidance as lib
        import llguidance.hf  # noqa: F401  (from_tokenizer)
    except ImportError:
        raise ConfigError(
            "Output constraints (json_schema, regex, grammar, tools) need the llguidance "
            f"package; install it with: {INSTALL_HINT}."
        ) from None
    version = getattr(lib, "__version__", None) or importlib.metadata.version("llguidance")
    if _release(version) < MIN_LLGUIDANCE:
        # Before 1.7 `llguidance.hf.from_tokenizer` took one EOS id, not the list we pass.
        raise ConfigError(
            f"Output constraints need llguidance >= {'.'.join(map(str, MIN_LLGUIDANCE))}; "
            f"{version} is installed. Upgrade it with: {INSTALL_HINT}."
        )
    return lib


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string ("1.9.1" -> (1, 9, 1))."""
    numbers = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


@dataclass(frozen=True)
class ConstraintSpec:
    """A row's constraint as llguidance grammar text, and where it came from."""

    grammar: str
    """llguidance's grammar (a JSON string: `LLMatcher.grammar_from_*`)."""
    source: str
    """What set it, for messages: `json_schema`, `regex`, `grammar` or `tools`."""


def grammar_text(field: str, value: Any) -> str:
    """The llguidance grammar of a `GenerationConfig` constraint field."""
    matcher = llguidance().LLMatcher
    if field == "json_schema":
        if not isinstance(value, dict):
            raise ConfigError(
                f"json_schema must be a JSON schema as a dict, got {type(value).__name__}."
            )
        return str(matcher.grammar_from_json_schema(json.dumps(value), overrides=JSON_OPTIONS))
    if field == "regex":
        return str(matcher.grammar_from_regex(value))
    return str(matcher.grammar_from_lark(value))


def check_constraint(field: str, value: Any) -> ConstraintSpec:
    """The spec of a constraint field; `ValueError` naming the field when llguidance
    cannot compile it (raised from `GenerationConfig`'s check, so it becomes a
    `ConfigError`).
    """
    try:
        grammar = grammar_text(field, value)
    except ValueError as exc:  # not JSON-serialisable, or refused by llguidance
        raise ValueError(f"{field} cannot be used as a constraint: {exc}") from None
    error = llguidance().LLMatcher.validate_grammar(grammar, None)
    if error:
        raise ValueError(
            f"{field} cannot be compiled by the grammar library (llguidance): "
            f"{' '.join(error.split())}; fix the {field} or drop it"
        )
    return ConstraintSpec(grammar=grammar, source=field)
