"""Any `MemberSpec` field from the command line: `--member-option [INDEX:]FIELD=VALUE`
(every member, or member INDEX only) and `--members-file FILE` (a JSON or TOML list of
members, each with its own fields).

    deepen generate -m big-model --member-option device_map=auto \\
        --member-option 'max_memory={"0": "20GiB", "cpu": "60GiB"}' "Hello"
    deepen serve --members-file members.toml

A VALUE is read as JSON when it parses (`{"0": "20GiB"}`, `4`, `true`), else as the text
itself (`auto`, `bfloat16`, `/tmp/offload`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def parse_member_option(text: str) -> tuple[int | None, str, Any]:
    """`[INDEX:]FIELD=VALUE` -> (member index or None for every member, field, value)."""
    target, sep, value = text.partition("=")
    if not sep or not target:
        raise ConfigError(
            f"--member-option {text!r} must be FIELD=VALUE or INDEX:FIELD=VALUE, e.g. "
            "device_map=auto or 1:dtype=bfloat16"
        )
    index: int | None = None
    if ":" in target:
        head, _, target = target.partition(":")
        if not head.isdigit():
            raise ConfigError(
                f"--member-option {text!r}: {head!r} is not a member index (0 is the first --model)"
            )
        index = int(head)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return index, target.strip(), parsed


def apply_member_options(
    members: list[dict[str, Any]], options: list[str] | None
) -> list[dict[str, Any]]:
    """The members' settings with each `--member-option` applied (later options win)."""
    for text in options or []:
        index, field, value = parse_member_option(text)
        if index is not None and index >= len(members):
            raise ConfigError(
                f"--member-option {text!r}: member {index} does not exist; there are "
                f"{len(members)} member(s), numbered from 0 in --model order"
            )
        for i, member in enumerate(members):
            if index is None or i == index:
                member[field] = value
    return members


def read_members_file(path: str) -> list[dict[str, Any]]:
    """The members of a JSON file (a list, or `{"members": [...]}`) or a TOML file
    (`[[members]]` tables): each a `source` and any other MemberSpec fields.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--members-file {path!r} does not exist; give a .json or .toml file.")
    text = file.read_text()
    try:
        data: Any = _toml(path, text) if file.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(
            f"--members-file {path!r} is not valid {file.suffix[1:]}: {exc}"
        ) from None
    members = data.get("members") if isinstance(data, dict) else data
    if not isinstance(members, list) or not members:
        raise ConfigError(
            f"--members-file {path!r} must hold a non-empty list of members (JSON: a list or "
            '{"members": [...]}; TOML: [[members]] tables)'
        )
    for i, member in enumerate(members):
        if not isinstance(member, dict) or "source" not in member:
            raise ConfigError(
                f"--members-file {path!r}: member {i} must be a table with a source, e.g. "
                '{"source": "gemma-3-270m", "dtype": "bfloat16"}'
            )
    return [dict(m) for m in members]


def _toml(path: str, text: str) -> Any:
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]  # Python 3.11+
    except ImportError:
        raise ConfigError(
            f"--members-file {path!r}: reading TOML needs Python 3.11 or later; write the "
            "members as JSON"
        ) from None
    return tomllib.loads(text)
