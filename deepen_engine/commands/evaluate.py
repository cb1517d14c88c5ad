"""`deepen eval`: capital-city QA for each member alone and for the ensemble.

    deepen eval --n 150 --seed 0                 # uniform weights, Gemma-3 main
    deepen eval --main 1 --weights adaptive      # DeePEn-Adapt weights from the dev set
    deepen eval --sweep-eta 0.05 0.15 0.5 --sweep-steps 5 10 --sweep-main 0 1   # dev set
    deepen eval --task tools --n 60 --seed 0     # tool calls (eval_tools.py)

Prints a table (or `--json`), writes every answer to `--output` (JSONL), shows a progress
bar on stderr. The task, scoring and the adaptive formula are in eval_task.py.

With `--sweep-eta`, the command scores the ensemble on the dev set only (settings are
chosen on dev, never on test) for every eta x `--sweep-steps` x `--sweep-main`, and writes
`<sweep-output>.json`, `.md` (a table) and `.png` (accuracy against eta).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..ensemble import Ensemble
from ..errors import ConfigError
from .eval_task import (
    MAX_NEW_TOKENS,
    Question,
    Score,
    adaptive_weights,
    load_questions,
    score,
    split_questions,
)
from .eval_tools import run_tools_eval
from .options import fusion_options, fusion_settings, member_options, member_specs
from .plotting import plot_sweep


def add_parser(sub: Any) -> None:
    """Register `deepen eval`."""
    ev = sub.add_parser(
        "eval",
        parents=[member_options(), fusion_options(main_default=None, weights=False)],
        help="capital-city QA or tool calls: each member alone vs the ensemble",
    )
    ev.add_argument(
        "--task",
        choices=["capitals", "tools"],
        default="capitals",
        help="capitals: few-shot capital-city QA (default); tools: tool calls with and "
        "without the grammar constraint (eval_tools.py; main: the chat rule unless --main)",
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
    ev.add_argument("--n", type=int, default=150, help="test questions (default 150)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the question split (default 0)")
    ev.add_argument("--shots", type=int, default=4, help="few-shot examples (default 4)")
    ev.add_argument("--dev-size", type=int, default=50, help="dev questions (default 50)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    ev.add_argument("--output", default="deepen-eval.jsonl", help="per-question outputs (JSONL)")
    ev.add_argument(
        "--sweep-eta",
        type=float,
        nargs="+",
        help="sweep mode: score the ensemble on the dev set for each of these etas",
    )
    ev.add_argument("--sweep-steps", type=int, nargs="+", help="sweep: steps values (--steps)")
    ev.add_argument("--sweep-main", type=int, nargs="+", help="sweep: main members (--main)")
    ev.add_argument(
        "--sweep-output",
        default="deepen-sweep",
        help="sweep: writes PREFIX.json, PREFIX.md (table) and PREFIX.png (plot)",
    )
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ev.set_defaults(run=run_eval)


def _answerer(view: Ensemble, batch_size: int) -> Callable[[list[str]], list[str]]:
    def generate(prompts: list[str]) -> list[str]:
        results = view.generate(
            prompts, max_new_tokens=MAX_NEW_TOKENS, stop=["\n"], batch_size=batch_size
        )
        return [r.text for r in results]

    return generate


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


def _members_alone(
    ens: Ensemble,
    shots: Sequence[Question],
    questions: Sequence[Question],
    bar: Any,
    args: argparse.Namespace,
    suffix: str = "",
) -> list[Score]:
    """Each member alone (main member, eta 0) on the questions, labelled name + suffix."""
    return [
        score(
            f"{m.name}{suffix}",
            _answerer(ens.with_fusion(main=i, eta=0), args.batch_size),
            shots,
            questions,
            bar.update,
            args.batch_size,
        )
        for i, m in enumerate(ens.members)
    ]


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by the parsed `deepen eval` arguments."""
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}.")
    if args.task == "tools":
        return run_tools_eval(args, Ensemble(member_specs(args), **fusion_settings(args)))
    weights = _weights(args.weights)
    split = split_questions(load_questions(), args.seed, args.shots, args.dev_size)
    test = split.test[: args.n]
    ens = Ensemble(
        member_specs(args),
        **fusion_settings(args),
        weights=weights if isinstance(weights, list) else None,
    )
    names = [m.name for m in ens.members]
    if args.sweep_eta:
        return _run_sweep(args, ens, split, weights)
    n_runs = len(names) * len(test) + len(test)
    if weights == "adaptive":
        n_runs += len(names) * len(split.dev)
    dev_scores: list[Score] = []
    with tqdm(total=n_runs, desc="deepen eval", file=sys.stderr) as bar:
        if weights == "adaptive":
            dev_scores = _members_alone(ens, split.shots, split.dev, bar, args, " (dev)")
            ens = ens.with_fusion(weights=adaptive_weights([s.accuracy for s in dev_scores]))
        scores = _members_alone(ens, split.shots, test, bar, args)
        label = f"ensemble (main {ens.main.name})"
        fused = _answerer(ens, args.batch_size)
        scores.append(score(label, fused, split.shots, test, bar.update, args.batch_size))

    output = Path(args.output)
    _write_records(output, dev_scores + scores)
    summary: dict[str, Any] = {
        "task": "capital-city QA (countryinfo)",
        "seed": args.seed,
        "shots": args.shots,
        "test_questions": len(test),
        "members": names,
        "main": ens.main.name,
        "eta": ens.fusion.eta,
        "steps": ens.fusion.steps,
        "weights": [round(w, 4) for w in ens.fusion.normalised_weights(len(names))],
        "weight_mode": _weight_mode(weights),
        "dev": [s.summary() for s in dev_scores],
        "results": [s.summary() for s in scores],
        "best_member_accuracy": round(max(s.accuracy for s in scores[:-1]), 4),
        "ensemble_minus_best_member": round(
            scores[-1].accuracy - max(s.accuracy for s in scores[:-1]), 4
        ),
        "outputs": str(output),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    _print_summary(summary, scores)
    return 0


def _print_summary(summary: dict[str, Any], scores: list[Score]) -> None:
    print(
        f"capital-city QA, seed {summary['seed']}, {summary['test_questions']} test questions, "
        f"{summary['shots']}-shot"
    )
    print(f"weights {summary['weights']} ({summary['weight_mode']}), eta {summary['eta']}, "
          f"steps {summary['steps']}")  # fmt: skip
    for s in scores:
        low, high = s.interval
        print(
            f"  {s.system:40} {s.accuracy:6.1%}  [{low:.1%}, {high:.1%}]  ({s.correct}/{s.total})"
        )
    print(f"per-question outputs: {summary['outputs']}")


def _write_records(path: Path, scores: Sequence[Score]) -> None:
    """Every answer of these scores, one JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for s in scores:
            for record in s.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_sweep(args: argparse.Namespace, n_members: int) -> tuple[list[int], list[int]]:
    if any(e < 0 for e in args.sweep_eta):
        raise ConfigError(f"--sweep-eta values must be >= 0, got {args.sweep_eta}.")
    steps = args.sweep_steps or [args.steps]
    if any(s < 0 for s in steps):
        raise ConfigError(f"--sweep-steps values must be >= 0, got {steps}.")
    mains = args.sweep_main or [args.main or 0]
    bad = [m for m in mains if not 0 <= m < n_members]
    if bad:
        raise ConfigError(
            f"--sweep-main {bad} out of range for {n_members} members; give 0 to {n_members - 1}."
        )
    if not args.dev_size:
        raise ConfigError("--sweep-eta scores on the dev set: give --dev-size >= 1.")
    return steps, mains


def _run_sweep(
    args: argparse.Namespace, ens: Ensemble, split: Any, weights: list[float] | str | None
) -> int:
    """Dev-set accuracy of the ensemble for every eta x steps x main member."""
    steps_list, mains = _check_sweep(args, len(ens.members))
    names = [m.name for m in ens.members]
    grid = [(main, steps, eta) for main in mains for steps in steps_list for eta in args.sweep_eta]
    fused_runs = [g for g in grid if g[1] > 0 and g[2] > 0]  # eta 0 / 0 steps: main alone
    with tqdm(
        total=len(split.dev) * (len(names) + len(fused_runs)), desc="deepen eval sweep",
        file=sys.stderr,
    ) as bar:  # fmt: skip
        alone = _members_alone(ens, split.shots, split.dev, bar, args)
        if weights == "adaptive":
            ens = ens.with_fusion(weights=adaptive_weights([s.accuracy for s in alone]))
        scores: list[tuple[tuple[int, int, float], Score]] = []
        for main, steps, eta in grid:
            if steps == 0 or eta == 0:
                result = alone[main]
            else:
                label = f"ensemble main={names[main]} steps={steps} eta={eta}"
                answer = _answerer(
                    ens.with_fusion(main=main, steps=steps, eta=eta), args.batch_size
                )
                result = score(label, answer, split.shots, split.dev, bar.update, args.batch_size)
            scores.append(((main, steps, eta), result))
    rows = [
        {"main": names[main], "steps": steps, "eta": eta, **result.summary()}
        for (main, steps, eta), result in scores
    ]
    best = max(rows, key=lambda r: r["accuracy"])  # the first of equals: grid order
    sweep = {
        "task": "capital-city QA (countryinfo), dev set",
        "seed": args.seed,
        "shots": args.shots,
        "dev_questions": len(split.dev),
        "members": names,
        "weights": [round(w, 4) for w in ens.fusion.normalised_weights(len(names))],
        "weight_mode": _weight_mode(weights),
        "members_alone": [s.summary() for s in alone],
        "rows": rows,
        "best": best,
    }
    prefix = Path(args.sweep_output)
    files = {ext: str(prefix.with_name(prefix.name + ext)) for ext in (".json", ".md", ".png")}
    sweep["files"] = files
    Path(files[".json"]).write_text(json.dumps(sweep, indent=1) + "\n", encoding="utf-8")
    Path(files[".md"]).write_text(_sweep_table(sweep), encoding="utf-8")
    plot_sweep(sweep, files[".png"])
    _write_records(
        Path(args.output), alone + [result for _, result in scores if result not in alone]
    )
    if args.json:
        print(json.dumps(sweep))
        return 0
    print(_sweep_table(sweep), end="")
    return 0


def _weight_mode(weights: list[float] | str | None) -> str:
    if weights == "adaptive":
        return "adaptive"
    return "explicit" if weights else "uniform"


def _sweep_table(sweep: dict[str, Any]) -> str:
    """Markdown: one row per eta, one column per (main, steps); members alone below."""
    columns = list(dict.fromkeys((r["main"], r["steps"]) for r in sweep["rows"]))
    etas = list(dict.fromkeys(r["eta"] for r in sweep["rows"]))
    cell = {(r["main"], r["steps"], r["eta"]): r for r in sweep["rows"]}
    best = sweep["best"]
    lines = [
        f"Dev accuracy, {sweep['dev_questions']} questions, seed {sweep['seed']}, "
        f"weights {sweep['weights']} ({sweep['weight_mode']}); eta 0 = the main member alone.",
        "",
        "| eta | " + " | ".join(f"main {m}, {s} steps" for m, s in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for eta in etas:
        cells = []
        for main, steps in columns:
            r = cell[(main, steps, eta)]
            text = f"{r['accuracy']:.1%} ({r['correct']}/{r['total']})"
            cells.append(f"**{text}**" if r is best else text)
        lines.append(f"| {eta:g} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in sweep["members_alone"]:
        lines.append(f"- {m['system']} alone: {m['accuracy']:.1%} ({m['correct']}/{m['total']})")
    lines.append(
        f"- best on dev: main {best['main']}, {best['steps']} steps, eta {best['eta']:g}: "
        f"{best['accuracy']:.1%}"
    )
    return "\n".join(lines) + "\n"
