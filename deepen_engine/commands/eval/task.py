"""The pieces every `deepen eval` task shares: questions, the seeded split, scoring,
intervals, and DeePEn-Adapt's weights. The tasks themselves are in tasks.py.

- split: the questions shuffled with `random.Random(seed)`; the first `shots` are the
  few-shot examples, the next `dev_size` the dev set (for choosing settings and adaptive
  weights), the rest the test set (`n` limits it);
- prompt: `shots` solved examples in the task's template, then the question; greedy
  decoding, at most the task's `max_new_tokens`, cut at the first newline;
- score: the task's check of the first line of the output (exact match after
  normalisation for text answers: Unicode NFKD with accents removed, case folded,
  punctuation and extra spaces dropped, so `Bogotá` = `bogota`);
- 95% confidence interval: Wilson score interval of the accuracy;
- adaptive weights (DeePEn-Adapt): each member's weight is its dev-set accuracy alone,
  normalised to sum 1: `w_i = acc_i / sum_j acc_j` (uniform if all are 0);
- records: every answer of a set of scores, one JSON object per line (`write_records`).
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError


@dataclass(frozen=True)
class Question:
    """One question: what it asks about, and every answer that counts."""

    subject: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        """The first listed answer (used in few-shot examples)."""
        return self.answers[0]


@dataclass(frozen=True)
class Task:
    """A few-shot task: its questions, prompt template and scorer."""

    name: str
    """Command-line name (`--task`)."""
    title: str
    """What it is, for tables."""
    template: str
    """One question's text, `{subject}` filled in; the answer follows after a space."""
    load: Callable[[], list[Question]]
    """Every question, in a fixed order (the split shuffles them with the seed)."""
    check: Callable[[str, Sequence[str]], bool]
    """Whether an output answers correctly, given the accepted answers."""
    max_new_tokens: int = 12

    def prompt(self, shots: Sequence[Question], question: Question) -> str:
        """The few-shot prompt for one question."""
        examples = "".join(
            self.template.format(subject=q.subject) + f" {q.answer}\n\n" for q in shots
        )
        return examples + self.template.format(subject=question.subject)


@dataclass
class Split:
    """Few-shot examples, dev set and test set of one seed."""

    shots: list[Question]
    dev: list[Question]
    test: list[Question]


def split_questions(
    questions: Sequence[Question], seed: int, shots: int = 4, dev_size: int = 50
) -> Split:
    """Shuffle with the seed, then cut into shots, dev and test."""
    if shots < 0 or dev_size < 0:
        raise ConfigError(f"shots and dev_size must be >= 0, got {shots} and {dev_size}.")
    if shots + dev_size >= len(questions):
        raise ConfigError(
            f"shots + dev_size = {shots + dev_size} leaves no test questions out of "
            f"{len(questions)}; lower them."
        )
    order = list(questions)
    random.Random(seed).shuffle(order)
    return Split(
        shots=order[:shots],
        dev=order[shots : shots + dev_size],
        test=order[shots + dev_size :],
    )


def normalise(text: str) -> str:
    """Accents removed, case folded, punctuation dropped, spaces collapsed."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    words = re.sub(r"[^\w\s]", " ", bare).split()
    return " ".join(words)


def extract_answer(output: str) -> str:
    """The first line of the model's output, stripped."""
    return output.strip().split("\n", 1)[0].strip()


def is_correct(output: str, answers: str | Sequence[str]) -> bool:
    """Exact match of the normalised first line against a normalised accepted answer."""
    spellings = [answers] if isinstance(answers, str) else answers
    got = normalise(extract_answer(output))
    return bool(got) and any(got == normalise(a) for a in spellings)


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (0, 0 for no data)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def adaptive_weights(dev_accuracies: Sequence[float]) -> list[float]:
    """DeePEn-Adapt: weights proportional to each member's dev accuracy alone."""
    total = sum(dev_accuracies)
    if total <= 0:
        return [1.0 / len(dev_accuracies)] * len(dev_accuracies)
    return [a / total for a in dev_accuracies]


@dataclass
class Score:
    """Accuracy of one system on one question set, with its per-question records."""

    system: str
    correct: int
    total: int
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Share of questions answered exactly."""
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.correct, self.total)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures (no records)."""
        low, high = self.interval
        return {
            "system": self.system,
            "accuracy": round(self.accuracy, 4),
            "ci95": [round(low, 4), round(high, 4)],
            "correct": self.correct,
            "total": self.total,
        }


def score(
    task: Task,
    system: str,
    generate: Callable[[list[str]], list[str]],
    shots: Sequence[Question],
    questions: Sequence[Question],
    progress: Callable[[int], object] | None = None,
    batch_size: int = 8,
) -> Score:
    """Ask every question of `task` through `generate` (prompts -> outputs) in batches."""
    result = Score(system=system, correct=0, total=0)
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start : start + batch_size])
        outputs = generate([task.prompt(shots, q) for q in chunk])
        for q, out in zip(chunk, outputs):
            ok = task.check(out, q.answers)  # any accepted answer
            result.correct += ok
            result.total += 1
            result.records.append(
                {
                    "task": task.name,
                    "system": system,
                    "subject": q.subject,
                    "answers": list(q.answers),
                    "output": out,
                    "correct": ok,
                }
            )
        if progress is not None:
            progress(len(chunk))
    return result


def write_records(path: Path, scores: Sequence[Score]) -> None:
    """Every answer of these scores, one JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for s in scores:
            for record in s.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
