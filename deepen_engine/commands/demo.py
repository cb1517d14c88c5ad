"""`deepen demo`: why ensemble? Each member's answer and the fused answer, side by side.

Without a prompt it asks few-shot capital-city questions in the format of `deepen eval`
(its seed-0 examples, greedy, cut at the first newline) and marks each answer right or
wrong against the capital `countryinfo` lists. The questions are ones where the default
members disagree (found by running `deepen eval --n 150 --seed 0`), so they show what
fusion does when members differ, gains and losses alike; they are not a score (run
`deepen eval` for that). Everything printed is computed by this run.

With a prompt it prints each member's continuation and the fused one.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..ensemble import Ensemble
from ..errors import ConfigError
from .eval.task import Question, extract_answer, is_correct, split_questions
from .eval.tasks import CAPITALS
from .inputs import argument_text, unescape
from .options import fusion_options, fusion_settings, member_options, member_specs
from .progress import announce_loading

COUNTRIES = (
    "Spain",
    "Greenland",
    "Guatemala",
    "South Africa",
    "Poland",
    "New Zealand",
    "Israel",
)
"""Questions on which Gemma-3-270m and SmolLM2-135M disagree (or are both wrong)."""


def add_parser(sub: Any) -> None:
    """Register `deepen demo`."""
    parser = sub.add_parser(
        "demo",
        parents=[member_options(), fusion_options()],
        help="each member's answer and the fused answer, side by side",
        description="Each member alone and the fused ensemble on a few capital-city "
        "questions where the members disagree (or on your prompt), side by side.",
    )
    parser.add_argument(
        "prompt", nargs="?", help="your own prompt (escape sequences like \\n processed)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"tokens per answer (default: {CAPITALS.max_new_tokens} for the questions, "
        "32 for a prompt)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the members, answer with each alone and with the ensemble, print a table."""
    prompt = unescape(argument_text(args.prompt, "the prompt")) if args.prompt else None
    if args.prompt is not None and not prompt:
        raise ConfigError("the prompt is empty; give some text, or no prompt for the questions.")
    n = args.max_new_tokens
    if n is None:
        n = 32 if prompt else CAPITALS.max_new_tokens
    if n < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {n}.")
    shots, items = ([], []) if prompt else _questions()  # before loading: fail fast
    start = time.perf_counter()
    ens = Ensemble(announce_loading(member_specs(args)), **fusion_settings(args))
    loaded = time.perf_counter() - start
    # each member alone (main i, eta 0: the others are not run), then the ensemble
    systems = [(m.name, ens.with_fusion(main=i, eta=0)) for i, m in enumerate(ens.members)]
    systems.append(("fused", ens))
    labels = [label for label, _ in systems]
    fusion = ens.fusion  # main "auto": each question led by the member that reads it best
    lead = "auto" if fusion.main == "auto" else ens.main.name
    weights = f", {fusion.weighting} weights" if fusion.weighting != "fixed" else ""
    print(
        f"fused = DeePEn ensemble of {' + '.join(m.name for m in ens.members)} (main "
        f"{lead}{weights}, eta {fusion.eta:g}, {fusion.steps} steps)\n"
    )
    start = time.perf_counter()
    if prompt:
        texts = [view.generate(prompt, max_new_tokens=n).text for _, view in systems]
        _print_continuations(prompt, labels, texts)
    else:
        prompts = [CAPITALS.prompt(shots, q) for q in items]
        answers = [
            [r.text for r in view.generate(prompts, max_new_tokens=n, stop=["\n"])]
            for _, view in systems
        ]
        _print_table(items, labels, answers)
    print(f"\n(members loaded in {loaded:.0f} s, answers in {time.perf_counter() - start:.0f} s)")
    return 0


def _questions() -> tuple[list[Question], list[Question]]:
    """(few-shot examples, demo questions): `deepen eval`'s seed-0 examples."""
    every = CAPITALS.load()
    by_country = {q.subject: q for q in every}
    missing = [c for c in COUNTRIES if c not in by_country]
    if missing:
        raise ConfigError(f"countryinfo lists no capital for {missing}; update countryinfo.")
    return split_questions(every, seed=0).shots, [by_country[c] for c in COUNTRIES]


def _print_table(questions: list[Question], labels: list[str], answers: list[list[str]]) -> None:
    """One row per question: the capital, then each system's answer marked right or wrong."""
    print("Few-shot questions 'Q: What is the capital of X?' on which the members disagree;")
    print("each answer marked against countryinfo's capital (+ right, - wrong).\n")
    header = ["country", "capital", *labels]
    rows = []
    for q, outputs in zip(questions, zip(*answers)):
        marked = [
            f"{'+' if is_correct(o, q.answers) else '-'} {shown(extract_answer(o)) or '(none)'}"
            for o in outputs
        ]
        rows.append([q.subject, q.answer, *marked])
    right = [sum(is_correct(o, q.answers) for o, q in zip(a, questions)) for a in answers]
    totals = [f"{n}/{len(questions)}" for n in right]
    rows.append(["right", "", *totals])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        if i == len(rows):  # before the totals
            print("  ".join("-" * w for w in widths))
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nThese questions were picked where the members differ; for a score on 150")
    print("questions with confidence intervals run `deepen eval` (docs/evaluation.md).")


def shown(answer: str, width: int = 28) -> str:
    """An answer for a table cell: control characters escaped (`\\x1c`), cut to `width`."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in answer)
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_continuations(prompt: str, labels: list[str], texts: list[str]) -> None:
    """Each system's continuation of the prompt, one block each."""
    print(f"prompt: {prompt!r}\n")
    width = max(len(label) for label in labels)
    for label, text in zip(labels, texts):
        print(f"{label.ljust(width)} | {text.strip()!r}")
