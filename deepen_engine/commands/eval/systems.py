"""The systems `deepen eval` scores, shared by the command (command.py) and its dev-set
sweeps (sweep.py): each member alone, and the ensemble by method and weighting; how each
answers a task's prompts, and its label in tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from ...config import FusionConfig
from ...ensemble import Ensemble
from ..options import METHODS
from .task import Question, Score, Task, score


def answerer(view: Ensemble, task: Task, batch_size: int) -> Callable[[list[str]], list[str]]:
    """Prompts -> the view's greedy answers, cut at the first newline."""

    def generate(prompts: list[str]) -> list[str]:
        results = view.generate(
            prompts, max_new_tokens=task.max_new_tokens, stop=["\n"], batch_size=batch_size
        )
        return [r.text for r in results]

    return generate


def members_alone(
    ens: Ensemble,
    task: Task,
    shots: Sequence[Question],
    questions: Sequence[Question],
    bar: Any,
    batch_size: int,
    suffix: str = "",
) -> list[Score]:
    """Each member alone (main member, eta 0) on the questions, labelled name + suffix."""
    return [
        score(
            task,
            f"{m.name}{suffix}",
            answerer(ens.with_fusion(main=i, eta=0, method="deepen"), task, batch_size),
            shots,
            questions,
            bar.update,
            batch_size,
        )
        for i, m in enumerate(ens.members)
    ]


def methods_named(raw: list[str] | None) -> list[str]:
    """The methods of `--method` (`all`: every one); default DeePEn."""
    if not raw:
        return ["deepen"]
    return list(METHODS) if "all" in raw else list(dict.fromkeys(raw))


def weightings_named(args: argparse.Namespace) -> list[str]:
    """The `--weighting` values, each once (default: the engine's, FusionConfig.weighting)."""
    return list(dict.fromkeys(args.weighting or [FusionConfig().weighting]))


def systems_named(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(method, weighting) of every ensemble to score: each `--method` with each
    `--weighting` (`weightings_named`).
    """
    return [(m, w) for m in methods_named(args.method) for w in weightings_named(args)]


def system_label(method: str, weighting: str, main: str) -> str:
    """`union (main gemma-3-270m)`; `union+confidence (...)` with confidence weighting."""
    suffix = "" if weighting == "fixed" else f"+{weighting}"
    return f"{method}{suffix} (main {main})"
