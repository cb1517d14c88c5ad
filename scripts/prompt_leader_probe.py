"""Does the prompt score pick the stronger member? A cheap probe of `main="auto"`.

For each task's dev questions (the same split `deepen eval` uses): each member alone
answers (greedy, as `deepen eval`), and each member's bits per byte of the few-shot prompt
is scored (a prefill, decoding/leaders.py). Printed per task: each member's accuracy, the
accuracy of answering with the lower-bpb member per question (what `main="auto"` with a
sharp `weighting="prompt"` comes to), the oracle (either member right), how often each
member has the lower score, and the mean bits per byte.

    HF_HUB_OFFLINE=1 python scripts/prompt_leader_probe.py --task capitals countries \
        arithmetic --seed 0 --json docs/prompt-leader-probe-seed0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from statistics import mean
from typing import Any

from deepen_engine import Ensemble, GenerationConfig
from deepen_engine.commands.eval.systems import answerer
from deepen_engine.commands.eval.task import split_questions
from deepen_engine.commands.eval.tasks import TASKS
from deepen_engine.decoding.leaders import score_rows
from deepen_engine.decoding.rows import NewRow


def main() -> int:
    """Run the probe on the tasks named; print and optionally write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--n", type=int, default=None, help="most questions per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument(
        "--fusion",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="also score the ensemble with these fusion settings (e.g. main=auto "
        "weighting=prompt weight_temperature=0.02); numbers are read as numbers",
    )
    parser.add_argument("--skip-scores", action="store_true", help="no prompt-score columns")
    args = parser.parse_args()
    ens = Ensemble()
    names = [m.name for m in ens.members]
    report: dict[str, Any] = {"seed": args.seed, "split": args.split, "members": names, "tasks": {}}
    for name in args.task:
        task = TASKS[name]
        split = split_questions(task.load(), args.seed)
        questions = (split.dev if args.split == "dev" else split.test)[: args.n]
        prompts = [task.prompt(split.shots, q) for q in questions]
        right = []
        for i in range(len(names)):
            ask = answerer(ens.with_fusion(main=i, eta=0), task, args.batch_size)
            outputs = []
            for start in range(0, len(prompts), args.batch_size):
                outputs += ask(prompts[start : start + args.batch_size])
            right.append([task.check(o, q.answers) for o, q in zip(outputs, questions)])
        if args.fusion is not None:
            fused = ens.with_fusion(**dict(_setting(kv) for kv in args.fusion))
            ask = answerer(fused, task, args.batch_size)
            outputs = []
            for start in range(0, len(prompts), args.batch_size):
                outputs += ask(prompts[start : start + args.batch_size])
            right.append([task.check(o, q.answers) for o, q in zip(outputs, questions)])
        if args.skip_scores:
            _print_ensemble(name, names, right, args, report)
            continue
        config = GenerationConfig()
        rows = [
            NewRow([(p, True)] * len(names), config, ens.fuser, index=b)
            for b, p in enumerate(prompts)
        ]
        bpb: list[list[float | None]] = []
        for start in range(0, len(rows), args.batch_size):
            bpb += score_rows(ens.members, rows[start : start + args.batch_size])
        leader = [min(range(len(names)), key=lambda i: s[i] or 0.0) for s in bpb]
        n = len(questions)
        figures = {
            "questions": n,
            "alone": {names[i]: 100 * sum(right[i]) / n for i in range(len(names))},
            "lower_bpb_member": 100 * sum(right[leader[b]][b] for b in range(n)) / n,
            "oracle": 100 * sum(any(r[b] for r in right) for b in range(n)) / n,
            "led_by": {names[i]: leader.count(i) for i in range(len(names))},
            "mean_bpb": {
                names[i]: mean(float(s[i] or 0.0) for s in bpb) for i in range(len(names))
            },
        }
        report["tasks"][name] = figures
        print(name, json.dumps(figures), file=sys.stderr, flush=True)
        if args.fusion is not None:
            _print_ensemble(name, names, right, args, report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


def _setting(text: str) -> tuple[str, object]:
    """`key=value` -> (key, value as int, float or text)."""
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _print_ensemble(
    name: str,
    names: list[str],
    right: list[list[bool]],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> None:
    """The ensemble's accuracy and its gains and losses against the best member alone."""
    n = len(right[0])
    alone = right[: len(names)]
    best = max(range(len(names)), key=lambda i: sum(alone[i]))
    fused = right[len(names)]
    figures = {
        "fusion": args.fusion,
        "ensemble": 100 * sum(fused) / n,
        "best_member": names[best],
        "best_member_accuracy": 100 * sum(alone[best]) / n,
        "gained": sum(f and not a for f, a in zip(fused, alone[best])),
        "lost": sum(a and not f for f, a in zip(fused, alone[best])),
    }
    report["tasks"].setdefault(name, {})["ensemble"] = figures
    print(name, json.dumps(figures), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
