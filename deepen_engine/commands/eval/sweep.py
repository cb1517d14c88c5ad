"""`deepen eval` sweep mode: settings scored on the dev sets only (settings are chosen on
dev, never on test).

The grid: every `--sweep-main` (a member index, or `auto`: each question led by the member
that reads its prompt best) x `--sweep-method` (default: the `--method` given) x
`--weighting` (default: the engine's), with `weighting="prompt"` for every
`--sweep-weight-temperature`; for DeePEn also every `--sweep-steps` x `--sweep-eta` (eta
0 or 0 steps is the main member alone). Every setting answers the dev questions of every
`--task`. Writes `<sweep-output>.json`, `.md` (one row per setting, one column per task) and
`.png` (dev accuracy by setting, one bar per task; members alone first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...ensemble import Ensemble
from ...errors import ConfigError
from ..plotting import plot_method_sweep
from .systems import answerer, members_alone, methods_named, weightings_named
from .task import Score, Split, Task, adaptive_weights, score, write_records

Setting = tuple[str, str, int | str, int | None, float | None, float | None]
"""method, weighting, main (an index or "auto"), steps, eta, weight temperature (prompt)"""


def _grid(args: argparse.Namespace, n_members: int) -> list[Setting]:
    """The settings to score, checked before anything runs."""
    etas = args.sweep_eta or [args.eta]
    if any(e < 0 for e in etas):
        raise ConfigError(f"--sweep-eta values must be >= 0, got {etas}.")
    steps_list = args.sweep_steps or [args.steps]
    if any(s < 0 for s in steps_list):
        raise ConfigError(f"--sweep-steps values must be >= 0, got {steps_list}.")
    if args.main == "dev" and not args.sweep_main:
        raise ConfigError("the sweep compares main members: give --sweep-main, not --main dev.")
    mains = args.sweep_main or [args.main]
    bad = [m for m in mains if m != "auto" and not (isinstance(m, int) and 0 <= m < n_members)]
    if bad:
        raise ConfigError(
            f"--sweep-main {bad} out of range for {n_members} members; give 0 to {n_members - 1} "
            "or auto."
        )
    if not args.dev_size:
        raise ConfigError("the sweep scores on the dev set: give --dev-size >= 1.")
    methods = args.sweep_method or methods_named(args.method)
    weightings = weightings_named(args)
    temperatures = args.sweep_weight_temperature or [args.weight_temperature]
    if any(t <= 0 for t in temperatures):
        raise ConfigError(f"--sweep-weight-temperature values must be > 0, got {temperatures}.")
    if args.sweep_weight_temperature and "prompt" not in weightings:
        raise ConfigError("--sweep-weight-temperature needs --weighting prompt.")
    grid: list[Setting] = []
    for main in mains:
        for method in methods:
            for w in weightings:
                for temp in temperatures if w == "prompt" else [None]:
                    if method != "deepen":
                        grid.append((method, w, main, None, None, temp))
                        continue
                    grid.extend(
                        ("deepen", w, main, st, eta, temp) for st in steps_list for eta in etas
                    )
    return grid


def _label(setting: Setting, names: list[str]) -> str:
    method, weighting, main, steps, eta, temp = setting
    name = method if weighting == "fixed" else f"{method}+{weighting}"
    if temp is not None:
        name += f" T={temp:g}"
    leader = main if isinstance(main, str) else names[main]
    if method != "deepen":
        return f"{name} main={leader}"
    return f"{name} main={leader} steps={steps} eta={eta:g}"


def run_sweep(
    args: argparse.Namespace,
    ens: Ensemble,
    tasks: list[Task],
    splits: dict[str, Split],
    weights: list[float] | str | None,
) -> int:
    """Dev accuracy of every setting of the grid on every task."""
    names = [m.name for m in ens.members]
    grid = _grid(args, len(names))
    identity = [s for s in grid if _is_member_alone(s)]
    total = sum(len(splits[t.name].dev) for t in tasks) * (len(names) + len(grid) - len(identity))
    rows: list[dict[str, Any]] = []
    alone_rows: list[dict[str, Any]] = []
    records: list[Score] = []
    with tqdm(total=total, desc="deepen eval sweep", file=sys.stderr) as bar:
        for task in tasks:
            split = splits[task.name]
            alone = members_alone(ens, task, split.shots, split.dev, bar, args.batch_size)
            alone_rows.extend({"task": task.name, **s.summary()} for s in alone)
            records.extend(alone)
            view = ens
            if weights == "adaptive":
                view = ens.with_fusion(weights=adaptive_weights([s.accuracy for s in alone]))
            for setting in grid:
                result = _score_setting(view, task, split, setting, alone, names, bar, args)
                if result not in alone:
                    records.append(result)
                method, weighting, main, steps, eta, temp = setting
                rows.append(
                    {"task": task.name, "method": method, "weighting": weighting,
                     "weight_temperature": temp,
                     "main": main if isinstance(main, str) else names[main],
                     "steps": steps, "eta": eta, **result.summary()}
                )  # fmt: skip
    sweep = {
        "seed": args.seed,
        "shots": args.shots,
        "dev_questions": {t.name: len(splits[t.name].dev) for t in tasks},
        "members": names,
        "tasks": [t.name for t in tasks],
        "members_alone": alone_rows,
        "rows": rows,
        "best": {
            t.name: max((r for r in rows if r["task"] == t.name), key=_accuracy) for t in tasks
        },
    }
    prefix = Path(args.sweep_output)
    files = {ext: str(prefix.with_name(prefix.name + ext)) for ext in (".json", ".md", ".png")}
    sweep["files"] = files
    Path(files[".json"]).write_text(json.dumps(sweep, indent=1) + "\n", encoding="utf-8")
    Path(files[".md"]).write_text(sweep_table(sweep), encoding="utf-8")
    plot_method_sweep(sweep, files[".png"])
    write_records(Path(args.output), records)
    print(json.dumps(sweep) if args.json else sweep_table(sweep), end="\n" if args.json else "")
    return 0


def _is_member_alone(setting: Setting) -> bool:
    """DeePEn with eta 0 or 0 steps, led by a fixed member: that member alone."""
    method, _, main, steps, eta, _ = setting
    return method == "deepen" and (steps == 0 or eta == 0) and isinstance(main, int)


def _accuracy(row: dict[str, Any]) -> float:
    return float(row["accuracy"])  # max() keeps the first of equals: grid order


def _score_setting(
    view: Ensemble,
    task: Task,
    split: Split,
    setting: Setting,
    alone: list[Score],
    names: list[str],
    bar: Any,
    args: argparse.Namespace,
) -> Score:
    method, weighting, main, steps, eta, temp = setting
    if _is_member_alone(setting) and isinstance(main, int):
        return alone[main]  # the main member alone, exactly
    changes: dict[str, Any] = {"method": method, "weighting": weighting, "main": main}
    if method == "deepen":
        changes.update(steps=steps, eta=eta)
    if temp is not None:
        changes.update(weight_temperature=temp)
    answer = answerer(view.with_fusion(**changes), task, args.batch_size)
    label = _label(setting, names)
    return score(task, label, answer, split.shots, split.dev, bar.update, args.batch_size)


def sweep_table(sweep: dict[str, Any]) -> str:
    """Markdown: members alone, then one row per setting; one column per task."""
    tasks = sweep["tasks"]
    header = " | ".join(f"{t} ({sweep['dev_questions'][t]})" for t in tasks)
    lines = [
        f"Dev accuracy, seed {sweep['seed']}, {sweep['shots']}-shot; best per task in bold.",
        "",
        f"| system | {header} |",
        "|---|" + "---|" * len(tasks),
    ]
    cell = {}
    for r in sweep["members_alone"]:
        cell[(f"{r['system']} alone", r["task"])] = r
    for r in sweep["rows"]:
        main = r["main"] if r["main"] == "auto" else sweep["members"].index(r["main"])
        temp = r.get("weight_temperature")
        setting = (r["method"], r["weighting"], main, r["steps"], r["eta"], temp)
        cell[(_label(setting, sweep["members"]), r["task"])] = r
    for system in dict.fromkeys(s for s, _ in cell):
        cells = []
        for t in tasks:
            r = cell.get((system, t))
            text = "" if r is None else f"{r['accuracy']:.1%} ({r['correct']}/{r['total']})"
            if r is not None and r is sweep["best"][t]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
