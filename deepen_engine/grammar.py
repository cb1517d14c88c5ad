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


JSON_INTEGER_DIGITS = 12
"""Digits a JSON number may have before its point when the schema sets no bound on that
side (`minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`): at most 999,999,999,999.
Without it a degenerate distribution can write `1000000...` until the token limit."""

JSON_FRACTION_DIGITS = 6
"""Digits a JSON `number` may have after its point when the schema has no `multipleOf`
(the bound is `multipleOf: 1e-6`, which also keeps exponents out)."""

DIGIT_RUN_PATTERN = f"^(?:[0-9]{{0,{JSON_INTEGER_DIGITS}}}[^0-9])*[0-9]{{0,{JSON_INTEGER_DIGITS}}}$"
"""The pattern given to JSON strings with no `pattern`, `format`, `maxLength`, `enum` or
`const` of their own: no run of more than `JSON_INTEGER_DIGITS` digits (measured: a
fused distribution wrote `"21.5000000000..."` into a string field until the limit)."""

_STRING_BOUNDS = ("pattern", "format", "maxLength", "enum", "const")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# Not `not` or `if`: a bound inside them would widen what the schema allows.
_SUBSCHEMAS = ("items", "additionalProperties", "then", "else", "contains")


def bound_numbers(schema: Any) -> Any:
    """A copy of a JSON schema whose numbers cannot run on (`JSON_INTEGER_DIGITS`,
    `JSON_FRACTION_DIGITS`), nor digits in its strings (`DIGIT_RUN_PATTERN`); the schema's
    own bounds, `multipleOf`, `pattern`, `format`, `maxLength`, `enum` and `const` take
    precedence.

    Each side is bounded on its own: `{"type": "integer", "minimum": 0}` keeps its minimum
    and gains `maximum: 999999999999`.
    """
    if isinstance(schema, list):
        return [bound_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_LISTS or key in _SUBSCHEMAS:
            out[key] = bound_numbers(value)
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: bound_numbers(sub) for name, sub in value.items()}
        else:
            out[key] = value
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if "integer" in types or "number" in types:
        largest = 10**JSON_INTEGER_DIGITS - 1
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -largest
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = largest
        if "number" in types and "multipleOf" not in schema:
            out["multipleOf"] = 10.0**-JSON_FRACTION_DIGITS
    if "string" in types and not any(key in schema for key in _STRING_BOUNDS):
        out["pattern"] = DIGIT_RUN_PATTERN
    return out


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
        schema = json.dumps(bound_numbers(value))
        return str(matcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))
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
