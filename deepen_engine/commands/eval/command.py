"""`deepen eval`: few-shot tasks for each member alone and for the ensemble, by method.

    deepen eval --n 150 --seed 0                         # capitals, DeePEn, Gemma-3 main
    deepen eval --task all --method all --json           # 4 tasks x (members + 3 methods)
    deepen eval --task demonyms --systems members --split dev   # members + oracle on dev
    deepen eval --main 1 --weights adaptive              # DeePEn-Adapt weights from dev
    deepen eval --task all --sweep-method deepen union unite --sweep-main 0 1   # dev set
    deepen eval --task tools --n 60 --seed 0             # tool calls (tools.py)

For every task (tasks.py) the members alone and every `--method` answer the same test
questions; each system's accuracy has a 95% Wilson interval and each ensemble an exact
McNemar test against the best member alone on that task (stats.py). Prints a table
(or `--json`), writes every answer to `--output` (JSONL), shows a progress bar on stderr.
With `--sweep-eta` or `--sweep-method` the command scores settings on the dev sets only
(sweep.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...config import FusionConfig
from ...ensemble import Ensemble
from ...errors import ConfigError
from ...members import cache_dir
from ..options import METHODS, fusion_options, fusion_settings, member_options, member_specs
from ..progress import announce_loading
from .stats import mcnemar, oracle
from .sweep import run_sweep
from .systems import answerer, members_alone, system_label, systems_named
from .task import (
    Question,
    Score,
    Split,
    Task,
    adaptive_weights,
    score,
    split_questions,
    write_records,
)
from .tasks import TASKS, tasks_named
from .tools import run_tools_eval


def add_parser(sub: Any) -> None:
    """Register `deepen eval`."""
    ev = sub.add_parser(
        "eval",
        parents=[
            member_options(),
            fusion_options(weights=False, methods=True),
        ],
        help="few-shot tasks or tool calls: each member alone vs the ensemble, by method",
    )
    ev.add_argument(
        "--task",
        nargs="+",
        metavar="TASK",
        help=f"tasks: {', '.join(TASKS)} or all (default: capitals); or tools alone: tool "
        "calls with and without the grammar constraint (eval/tools.py; main: the chat rule "
        "unless --main)",
    )
    ev.add_argument(
        "--weights",
        nargs="+",
        help="one weight per member, or 'adaptive' (weights from dev accuracy, DeePEn-Adapt)",
    )
    ev.add_argument(
        "--tool-choice",
        choices=["auto", "required"],
        default="auto",
        help="tools task: auto (the model may answer in text; default) or required",
    )
    ev.add_argument(
        "--systems",
        choices=["all", "members"],
        default="all",
        help="all: members alone and every ensemble (default); members: members alone only "
        "(a cheap look at a task: their accuracies and the oracle)",
    )
    ev.add_argument(
        "--split",
        choices=["test", "dev"],
        default="test",
        help="the questions answered: test (default) or dev (for exploring a task; not with "
        "--weights adaptive or --main dev, which choose on dev)",
    )
    ev.add_argument(
        "--n", type=int, default=150, help="test (or --split dev) questions per task (default 150)"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the question split (default 0)")
    ev.add_argument("--shots", type=int, default=4, help="few-shot examples (default 4)")
    ev.add_argument("--dev-size", type=int, default=50, help="dev questions (default 50)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    ev.add_argument(
        "--output",
        help="per-question outputs (JSONL; default $DEEPEN_CACHE/eval/deepen-eval.jsonl, "
        "not the current directory)",
    )
    ev.add_argument(
        "--sweep-eta", type=float, nargs="+", help="sweep mode: DeePEn etas scored on dev"
    )
    ev.add_argument("--sweep-steps", type=int, nargs="+", help="sweep: DeePEn steps values")
    ev.add_argument(
        "--sweep-method", nargs="+", choices=METHODS, help="sweep mode: methods scored on dev"
    )
    ev.add_argument(
        "--sweep-main",
        type=_sweep_main,
        nargs="+",
        help="sweep: main members (--main): indexes, or auto (per question, the member that "
        "reads its prompt best)",
    )
    ev.add_argument(
        "--sweep-weight-temperature",
        type=float,
        nargs="+",
        help="sweep: temperatures of --weighting prompt (FusionConfig.weight_temperature)",
    )
    ev.add_argument(
        "--sweep-output",
        help="sweep: writes PREFIX.json, PREFIX.md (table) and PREFIX.png (plot) (default "
        "$DEEPEN_CACHE/eval/deepen-sweep)",
    )
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ev.set_defaults(run=run_eval)


def _sweep_main(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give member indexes or auto, got {text!r}") from None


def _weights(raw: list[str] | None) -> list[float] | str | None:
    if raw is None:
        return None
    if raw == ["adaptive"]:
        return "adaptive"
    try:
        return [float(w) for w in raw]
    except ValueError:
        raise ConfigError(
            f"--weights takes numbers (one per member) or 'adaptive', got {raw}."
        ) from None


def _run_tools(args: argparse.Namespace) -> int:
    """`--task tools`: one ensemble (one method, one weighting) against each member alone."""
    if args.task != ["tools"]:
        raise ConfigError(f"--task tools runs alone; got --task {' '.join(args.task)}.")
    systems = systems_named(args)
    if len(systems) > 1 or args.main == "dev":
        raise ConfigError(
            "--task tools compares one ensemble with its members: give one --method, one "
            "--weighting and a numbered --main or auto (or none: the chat rule)."
        )
    method, weighting = systems[0]
    settings = fusion_settings(args) | {"method": method, "weighting": weighting}
    return run_tools_eval(args, Ensemble(announce_loading(member_specs(args)), **settings))


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by the parsed `deepen eval` arguments."""
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}.")
    # Outputs go to the cache unless named: nothing is left in the user's directory.
    if args.output is None or args.sweep_output is None:
        (cache_dir() / "eval").mkdir(parents=True, exist_ok=True)
    args.output = args.output or str(cache_dir() / "eval" / "deepen-eval.jsonl")
    args.sweep_output = args.sweep_output or str(cache_dir() / "eval" / "deepen-sweep")
    if args.task and "tools" in args.task:
        return _run_tools(args)  # no --main: the chat rule leads
    if args.main is None:  # the engine's default leader (FusionConfig.main)
        args.main = FusionConfig.model_fields["main"].default
    weights = _weights(args.weights)
    if args.split == "dev" and (weights == "adaptive" or args.main == "dev"):
        raise ConfigError(
            "--split dev answers the dev questions, which --weights adaptive and --main dev "
            "choose from: drop one of them."
        )
    tasks = tasks_named(args.task)
    systems = systems_named(args)
    splits = {
        t.name: split_questions(t.load(), args.seed, args.shots, args.dev_size) for t in tasks
    }
    ens = Ensemble(
        announce_loading(member_specs(args)),
        **fusion_settings(args),
        method=systems[0][0],
        weighting=systems[0][1],
        weights=weights if isinstance(weights, list) else None,
    )
    if args.sweep_eta or args.sweep_method or args.sweep_weight_temperature:
        return run_sweep(args, ens, tasks, splits, weights)
    if args.systems == "members":
        systems = []
    per_task = len(ens.members) + len(systems)
    n_runs = sum(min(args.n, len(_asked(splits[t.name], args))) * per_task for t in tasks)
    if weights == "adaptive" or args.main == "dev":
        n_runs += sum(len(ens.members) * len(splits[t.name].dev) for t in tasks)
    reports, records = [], []
    with tqdm(total=n_runs, desc="deepen eval", file=sys.stderr) as bar:
        for task in tasks:
            report, scores = _run_task(ens, task, splits[task.name], systems, weights, bar, args)
            reports.append(report)
            records.extend(scores)
    output = Path(args.output)
    write_records(output, records)
    summary = {
        "seed": args.seed,
        "shots": args.shots,
        "split": args.split,
        "members": [m.name for m in ens.members],
        "main": args.main if args.main in ("auto", "dev") else ens.main.name,
        "methods": list(dict.fromkeys(m for m, _ in systems)),
        "weightings": list(dict.fromkeys(w for _, w in systems)),
        "fusion": {
            k: getattr(ens.fusion, k)
            for k in ("eta", "steps", "top_k", "top_mass", "unite_top_k", "weighting", "gate")
        },
        "weight_mode": _weight_mode(weights),
        "tasks": reports,
        "outputs": str(output),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(results_table(summary), end="")
        print(f"per-question outputs: {summary['outputs']}")
    return 0


def _run_task(
    ens: Ensemble,
    task: Task,
    split: Split,
    systems: list[tuple[str, str]],
    weights: list[float] | str | None,
    bar: Any,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[Score]]:
    """One task: members alone, then each method; the report and every score."""
    test = _asked(split, args)[: args.n]
    dev_scores: list[Score] = []
    view = ens
    if weights == "adaptive" or args.main == "dev":
        dev = split.dev
        dev_scores = members_alone(ens, task, split.shots, dev, bar, args.batch_size, " (dev)")
        dev_accuracy = [s.accuracy for s in dev_scores]
        if weights == "adaptive":
            view = view.with_fusion(weights=adaptive_weights(dev_accuracy))
        if args.main == "dev":  # the best member alone on dev leads (the first of equals)
            view = view.with_fusion(main=dev_accuracy.index(max(dev_accuracy)))
    alone = members_alone(ens, task, split.shots, test, bar, args.batch_size)
    best = max(alone, key=lambda s: s.accuracy)  # the first of equals: member order
    fused: list[Score] = []
    comparisons = []
    for method, weighting in systems:
        method_view = view.with_fusion(method=method, weighting=weighting)
        label = system_label(method, weighting, _leader(view))
        answer = answerer(method_view, task, args.batch_size)
        result = score(task, label, answer, split.shots, test, bar.update, args.batch_size)
        fused.append(result)
        stats = method_view.fuser.stats
        comparisons.append(
            {
                "system": label,
                "method": method,
                "weighting": weighting,
                "minus_best_member": round(result.accuracy - best.accuracy, 4),
                "mcnemar_vs_best_member": mcnemar(_correct(result), _correct(best)),
                "gated_share": round(stats.gated / stats.rows, 4) if stats.rows else None,
            }
        )
    report = {
        "task": task.name,
        "title": task.title,
        "test_questions": len(test),
        "main": _leader(view),
        "weights": [round(w, 4) for w in view.fusion.normalised_weights(len(ens.members))],
        "dev": [s.summary() for s in dev_scores],
        "results": [s.summary() for s in alone + fused],
        "best_member": best.system,
        "best_member_accuracy": round(best.accuracy, 4),
        "oracle": oracle(alone).summary(),
        "comparisons": comparisons,
    }
    return report, dev_scores + alone + fused


def _leader(view: Ensemble) -> str:
    """The leading member's name, or `auto` (each question's own, from its prompt)."""
    return "auto" if view.fusion.main == "auto" else view.main.name


def _asked(split: Split, args: argparse.Namespace) -> list[Question]:
    """The questions the systems answer: the test set, or the dev set with --split dev."""
    return split.dev if args.split == "dev" else split.test


def _correct(s: Score) -> list[bool]:
    return [bool(r["correct"]) for r in s.records]


def results_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per system, one column per task (accuracy, interval, McNemar)."""
    tasks = summary["tasks"]
    systems = list(dict.fromkeys(r["system"] for t in tasks for r in t["results"]))
    lines = [
        f"seed {summary['seed']}, {summary['split']} questions, {summary['shots']}-shot, "
        "greedy; 95% Wilson intervals; "
        "ensembles: points over the best member alone, exact McNemar p",
        "",
        "| system | " + " | ".join(f"{t['task']} ({t['test_questions']})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for system in systems:
        cells = []
        for t in tasks:
            r = next((r for r in t["results"] if r["system"] == system), None)
            if r is None:
                cells.append("")
                continue
            low, high = r["ci95"]
            text = f"{r['accuracy']:.1%} [{low:.1%}, {high:.1%}]"
            c = next((c for c in t["comparisons"] if c["system"] == system), None)
            if c is not None:
                test = c["mcnemar_vs_best_member"]
                p = test["p_value"]
                shown = "p<0.01" if p < 0.01 else f"p={p:.2f}"
                text += f" ({c['minus_best_member'] * 100:+.1f}, {shown})"
            cells.append(text)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    cells = []
    for t in tasks:  # the ceiling of any way of choosing between the members' answers
        o = t["oracle"]
        over = (o["accuracy"] - t["best_member_accuracy"]) * 100
        cells.append(f"{o['accuracy']:.1%} ({over:+.1f} over the best member)")
    lines.append("| oracle (any member right) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _weight_mode(weights: list[float] | str | None) -> str:
    if weights == "adaptive":
        return "adaptive"
    return "explicit" if weights else "uniform"
