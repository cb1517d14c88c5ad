"""`SchedulerConfig`'s limits as command-line flags (`--max-batch-size` etc.), declared once
for every command that builds a scheduler (`deepen serve`, `deepen bench`), with the
defaults (and a word field's choices) read from `SchedulerConfig` itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal, get_args, get_origin

from ..config import SchedulerConfig

LIMITS = {
    "max_batch_size": "most rows decoded together",
    "max_queue": "most requests waiting to start; more get 429",
    "speculate_max_rows": "most rows in the batch for speculative steps (requests' "
    "speculate); more: standard steps; 0: no limit",
    "draft_precision": "precision of the main member's own drafts: bfloat16 weights for "
    "drafting, verified in float32 (the same output); auto: bfloat16 where native",
}
"""SchedulerConfig field -> what its flag's help says of it."""


def add_scheduler_limits(
    parser: argparse.ArgumentParser, names: Sequence[str], where: dict[str, str] | None = None
) -> None:
    """`--max-batch-size`-style int flags for the `SchedulerConfig` fields `names`.

    where: per field, words put before its help (`"--serving: "`: the runs that read it).
    """
    for name in names:
        field = SchedulerConfig.model_fields[name]
        words = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        parser.add_argument(
            "--" + name.replace("_", "-"), type=str if words else int, choices=words,
            default=field.default,
            help=f"{(where or {}).get(name, '')}{LIMITS[name]} (default: {field.default})",
        )  # fmt: skip


def scheduler_limits(args: argparse.Namespace, names: Sequence[str]) -> SchedulerConfig:
    """The `SchedulerConfig` of the parsed flags `names` (the rest at their defaults)."""
    return SchedulerConfig(**{name: getattr(args, name) for name in names})
