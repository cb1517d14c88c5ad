"""The tasks of `deepen eval`, each built in code from data the project ships or generates,
with its own few-shot template and scorer:

- `capitals`: the capital of a country (PyPI `countryinfo`; any listed spelling counts);
- `countries`: the country of a capital (`countryinfo`; the country's name or any of its
  listed alternative names of three letters or more counts; capitals of several countries
  are left out). A world-region task was tried first and dropped: with four few-shot
  examples both default members answered one region for every country (16% on dev);
- `arithmetic`: the sum of two whole numbers from 1 to 20 (all 400 pairs; two-digit sums
  left both default members near 0%); the first integer of the answer must equal the sum;
- `demonyms`: what a person from a country is called (`countryinfo`'s demonym; compound
  demonyms such as `Serbian/Montenegrin` left out). Chosen as the fourth task because the
  default members are complementary on it, not ordered: on the seed-0 dev questions each
  member is right on several questions the other misses (docs/evaluation.md, "The fourth
  task"). Number words, Roman numerals, month and letter arithmetic, larger-of-two,
  parity, ISO codes and currency codes were measured first and dropped (one member far
  ahead, both near 0%, or the same answers from both; scripts/eval_candidates.py).

Each task's questions come in a fixed order; `split_questions` shuffles them with the
seed of the run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ...errors import ConfigError
from .task import Question, Task, extract_answer, is_correct

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


def load_countries() -> list[Question]:
    """Every capital of exactly one country in `countryinfo` -> that country, sorted."""
    by_capital: dict[str, list[Any]] = {}
    for c in _countries():
        capital = c.capital()
        if c.name() and isinstance(capital, str) and capital.strip():
            by_capital.setdefault(capital.strip(), []).append(c)
    out = []
    for capital in sorted(by_capital):
        if len(by_capital[capital]) != 1:
            continue  # Kingston, Jerusalem, ...: more than one country lists it
        (country,) = by_capital[capital]
        others = [a for a in country.alt_spellings() or [] if isinstance(a, str) and len(a) > 2]
        out.append(Question(subject=capital, answers=(country.name(), *others)))
    return out


def load_arithmetic() -> list[Question]:
    """Every sum `a + b` of whole numbers a, b from 1 to 20, in order."""
    return [
        Question(subject=f"{a} + {b}", answers=(str(a + b),))
        for a in ARITHMETIC_RANGE
        for b in ARITHMETIC_RANGE
    ]


def load_demonyms() -> list[Question]:
    """Every country with a single demonym in `countryinfo` -> that demonym, sorted."""
    out = {}
    for c in _countries():
        name, demonym = c.name(), c.info().get("demonym")
        if not (name and isinstance(demonym, str) and demonym.strip()):
            continue
        if "/" in demonym:
            continue  # `Serbian/Montenegrin`: two answers in one, no single right reply
        out[name] = Question(subject=name, answers=(demonym.strip(),))
    return [out[k] for k in sorted(out)]


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
COUNTRIES = Task(
    name="countries",
    title="country of a capital (countryinfo)",
    template="Q: Which country has the capital {subject}?\nA:",
    load=load_countries,
    check=is_correct,
)
ARITHMETIC = Task(
    name="arithmetic",
    title="addition of numbers from 1 to 20 (generated)",
    template="Q: What is {subject}?\nA:",
    load=load_arithmetic,
    check=first_integer_matches,
    max_new_tokens=6,
)
DEMONYMS = Task(
    name="demonyms",
    title="what a person from a country is called (countryinfo)",
    template="Q: What is a person from {subject} called?\nA:",
    load=load_demonyms,
    check=is_correct,
)
TASKS = {t.name: t for t in (CAPITALS, COUNTRIES, ARITHMETIC, DEMONYMS)}


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
