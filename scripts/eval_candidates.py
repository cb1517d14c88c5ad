"""Candidate fourth tasks for `deepen eval`, each member alone on the first dev questions.

    HF_HUB_OFFLINE=1 python scripts/eval_candidates.py                 # every candidate
    HF_HUB_OFFLINE=1 python scripts/eval_candidates.py iso2 currency --n 40

The search behind the fourth task (issue 21: the default members must be complementary on
it, the oracle at least the best member + 6 points on dev). Each candidate is built in code
from `countryinfo` or generated, split like every `deepen eval` task (seed 0, 4 shots, 50
dev questions), and answered by each default member alone on the first `--n` dev
questions, greedy, batched. Prints per candidate: each member's right answers, the oracle
(questions either member gets right), the questions only one member gets, and a few
answers side by side. The chosen task (`demonyms`) is not here: it lives in
deepen_engine/commands/eval/tasks.py and `deepen eval --task demonyms --systems members
--split dev --n 50` measures it.
"""

from __future__ import annotations

import argparse
import calendar
import random
import string
import time
from collections.abc import Callable

from deepen_engine import Ensemble
from deepen_engine.commands.eval.systems import members_alone
from deepen_engine.commands.eval.task import Question, Task, is_correct, split_questions
from deepen_engine.commands.eval.tasks import _countries, first_integer_matches

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ROMAN = [(100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V")]
ROMAN += [(4, "IV"), (1, "I")]


def words(n: int) -> str:
    """0 to 999 in English words: `forty-nine`, `four hundred nine`."""
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        return f"{ONES[hundreds]} hundred" + ("" if rest == 0 else f" {words(rest)}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else f"-{ONES[ones]}")


def roman(n: int) -> str:
    """1 to 399 in Roman numerals."""
    out = ""
    for value, symbol in ROMAN:
        while n >= value:
            out, n = out + symbol, n - value
    return out


def by_country(field: Callable[[dict[str, object]], object]) -> list[Question]:
    """Country name -> a `countryinfo` field (a string or a list of them), sorted by name."""
    out = []
    for c in _countries():
        value = field(c.info())
        answers = value if isinstance(value, list) else [value]
        spellings = tuple(a for a in answers if isinstance(a, str) and a)
        if c.name() and spellings:
            out.append(Question(c.name(), spellings))
    return sorted(out, key=lambda q: q.subject)


def iso2(info: dict[str, object]) -> object:
    """A country's ISO 3166 alpha-2 code (`FR`), if listed."""
    codes = info.get("ISO")
    return codes.get("alpha2") if isinstance(codes, dict) else None


def larger() -> list[Question]:
    """200 seeded pairs of different two-digit numbers -> the larger."""
    draw = random.Random(1)
    pairs = [draw.sample(range(10, 100), 2) for _ in range(200)]
    return [Question(f"{a} or {b}", (str(max(a, b)),)) for a, b in pairs]


MONTHS = list(calendar.month_name)[1:]
LETTERS = string.ascii_uppercase
CANDIDATES = [
    Task(
        "numwords",
        "a number in words",
        "Q: How do you write {subject} in words?\nA:",
        lambda: [Question(str(n), (words(n),)) for n in range(1, 100)],
        is_correct,
    ),
    Task(
        "wordnum",
        "words to a number (1-99)",
        "Q: What number is {subject}?\nA:",
        lambda: [Question(words(n), (str(n),)) for n in range(1, 100)],
        first_integer_matches,
        6,
    ),
    Task(
        "wordnum3",
        "words to a number (100-999)",
        "Q: What number is {subject}?\nA:",
        lambda: [Question(words(n), (str(n),)) for n in range(100, 1000, 3)],
        first_integer_matches,
        6,
    ),
    Task(
        "roman",
        "Roman numerals",
        "Q: What is {subject} in Roman numerals?\nA:",
        lambda: [Question(str(n), (roman(n),)) for n in range(1, 200)],
        is_correct,
    ),
    Task(
        "month",
        "month arithmetic",
        "Q: Which month is {subject}?\nA:",
        lambda: [
            Question(f"{k} months after {MONTHS[i]}", (MONTHS[(i + k) % 12],))
            for i in range(12)
            for k in range(1, 10)
        ],
        is_correct,
        6,
    ),
    Task(
        "times",
        "single-digit products",
        "Q: What is {subject}?\nA:",
        lambda: (
            [Question(f"{a} x {b}", (str(a * b),)) for a in range(2, 10) for b in range(2, 10)] * 2
        ),
        first_integer_matches,
        6,
    ),
    Task(
        "sub",
        "subtraction within 20",
        "Q: What is {subject}?\nA:",
        lambda: [Question(f"{a} - {b}", (str(a - b),)) for a in range(2, 21) for b in range(1, a)],
        first_integer_matches,
        6,
    ),
    Task(
        "letter",
        "letter arithmetic",
        "Q: Which letter is {subject} in the alphabet?\nA:",
        lambda: [
            Question(f"{k} letters after {LETTERS[i]}", (LETTERS[i + k],))
            for i in range(26)
            for k in range(1, 4)
            if i + k < 26
        ],
        is_correct,
        6,
    ),
    Task(
        "larger",
        "the larger of two numbers",
        "Q: Which number is larger, {subject}?\nA:",
        larger,
        first_integer_matches,
        6,
    ),
    Task(
        "parity",
        "even or odd",
        "Q: Is {subject} even or odd?\nA:",
        lambda: [Question(str(n), ("even" if n % 2 == 0 else "odd",)) for n in range(10, 210)],
        is_correct,
        4,
    ),
    Task(
        "iso2",
        "ISO two-letter country codes",
        "Q: What is the two-letter country code of {subject}?\nA:",
        lambda: by_country(iso2),
        is_correct,
        6,
    ),
    Task(
        "currency",
        "currency codes",
        "Q: What is the currency code of {subject}?\nA:",
        lambda: by_country(lambda info: info.get("currencies")),
        is_correct,
        6,
    ),
]


class _NoBar:
    def update(self, n: int) -> None:
        pass


def main() -> None:
    """Each member alone on each named candidate's first dev questions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [t.name for t in CANDIDATES]
    parser.add_argument("tasks", nargs="*", help=f"some of {', '.join(names)} (default: all)")
    parser.add_argument("--n", type=int, default=40, help="dev questions per task (default 40)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(names))
    if unknown:
        parser.error(f"{unknown[0]!r} is not a candidate; give some of {', '.join(names)}.")
    ens = Ensemble()
    for task in CANDIDATES:
        if args.tasks and task.name not in args.tasks:
            continue
        split = split_questions(task.load(), seed=0, shots=4, dev_size=50)
        start = time.perf_counter()
        first, second = members_alone(
            ens, task, split.shots, split.dev[: args.n], _NoBar(), args.batch_size
        )
        a = [bool(r["correct"]) for r in first.records]
        b = [bool(r["correct"]) for r in second.records]
        print(
            f"{task.name} ({task.title}): {len(a)} dev questions; {first.system} {sum(a)}, "
            f"{second.system} {sum(b)}, oracle {sum(x or y for x, y in zip(a, b))} (only "
            f"{first.system} {sum(x and not y for x, y in zip(a, b))}, only {second.system} "
            f"{sum(y and not x for x, y in zip(a, b))}); {time.perf_counter() - start:.0f} s"
        )
        for r0, r1 in list(zip(first.records, second.records))[:4]:
            answers = f"{r0['output']!r} / {r1['output']!r}"
            print(f"    {r0['subject']!r} -> {r0['answers'][0]!r}: {answers}")


if __name__ == "__main__":
    main()
