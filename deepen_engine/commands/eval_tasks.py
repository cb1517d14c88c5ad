"""The tasks of `deepen eval`, each built in code from data the project ships or generates,
with its own few-shot template and scorer:

- `capitals`: the capital of a country (PyPI `countryinfo`; any listed spelling counts);
- `regions`: the world region of a country, one of Africa, Americas, Asia, Europe, Oceania
  (`countryinfo`'s region field);
- `arithmetic`: the sum of two whole numbers from 1 to 20 (all 400 pairs; two-digit sums
  left both default members near 0%); the first integer of the answer must equal the sum.

Each task's questions come in a fixed order; `split_questions` shuffles them with the
seed of the run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .eval_task import Question, Task, extract_answer, is_correct

REGIONS = ("Africa", "Americas", "Asia", "Europe", "Oceania")
ARITHMETIC_RANGE = range(1, 21)  # operands of the arithmetic questions


def _countries() -> list[Any]:
    try:
        import countryinfo
    except ImportError as exc:  # an optional dependency: the `eval` extra
        raise ConfigError(
            "deepen eval needs the package 'countryinfo': pip install countryinfo"
        ) from exc
    return list(countryinfo.all_countries())


def load_capitals() -> list[Question]:
    """Every country with a capital in `countryinfo`, sorted by country name."""
    out = {}
    for c in _countries():
        name, capital = c.name(), c.capital()
        listed = capital if isinstance(capital, list) else [capital]
        spellings = tuple(s for s in listed if isinstance(s, str) and s.strip())
        if name and spellings:
            out[name] = Question(subject=name, answers=spellings)
    return [out[k] for k in sorted(out)]


def load_regions() -> list[Question]:
    """Every country whose `countryinfo` region is one of `REGIONS`, sorted by name."""
    out = {}
    for c in _countries():
        name, region = c.name(), c.region()
        if name and region in REGIONS:
            out[name] = Question(subject=name, answers=(region,))
    return [out[k] for k in sorted(out)]


def load_arithmetic() -> list[Question]:
    """Every sum `a + b` of whole numbers a, b from 1 to 20, in order."""
    return [
        Question(subject=f"{a} + {b}", answers=(str(a + b),))
        for a in ARITHMETIC_RANGE
        for b in ARITHMETIC_RANGE
    ]


def first_integer_matches(output: str, answers: Sequence[str]) -> bool:
    """The first integer on the answer's first line equals an accepted answer."""
    found = re.search(r"-?\d+", extract_answer(output).replace(",", ""))
    return found is not None and found.group(0) in answers


CAPITALS = Task(
    name="capitals",
    title="capital-city QA (countryinfo)",
    template="Q: What is the capital of {subject}?\nA:",
    load=load_capitals,
    check=is_correct,
)
REGION = Task(
    name="regions",
    title="world region of a country (countryinfo)",
    template="Q: In which region of the world is {subject}: "
    + ", ".join(REGIONS[:-1])
    + f" or {REGIONS[-1]}?\nA:",
    load=load_regions,
    check=is_correct,
    max_new_tokens=6,
)
ARITHMETIC = Task(
    name="arithmetic",
    title="addition of numbers from 1 to 20 (generated)",
    template="Q: What is {subject}?\nA:",
    load=load_arithmetic,
    check=first_integer_matches,
    max_new_tokens=6,
)
TASKS = {t.name: t for t in (CAPITALS, REGION, ARITHMETIC)}


def tasks_named(names: Sequence[str] | None) -> list[Task]:
    """The tasks named on the command line (`all`: every one); default `capitals`."""
    if not names:
        return [CAPITALS]
    if "all" in names:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(
            f"--task {unknown[0]!r} is not a task; give one of {', '.join(TASKS)} or all."
        )
    return [TASKS[n] for n in dict.fromkeys(names)]
