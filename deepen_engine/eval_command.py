"""`deepen eval`: capital-city QA for each member alone and for the ensemble.

    deepen eval --n 150 --seed 0                 # uniform weights, Gemma-3 main
    deepen eval --main 1 --weights adaptive      # DeePEn-Adapt weights from the dev set

Prints a table (or `--json`), writes every answer to `--output` (JSONL), shows a progress
bar on stderr. The task, scoring and the adaptive formula are in evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .ensemble import Ensemble
from .errors import ConfigError
from .evaluation import (
    MAX_NEW_TOKENS,
    Score,
    adaptive_weights,
    load_questions,
    score,
    split_questions,
)


def _answerer(view: Ensemble, batch_size: int):
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


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by the parsed `deepen eval` arguments."""
    from .cli import specs

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}.")
    weights = _weights(args.weights)
    split = split_questions(load_questions(), args.seed, args.shots, args.dev_size)
    test = split.test[: args.n]
    ens = Ensemble(
        specs(args),
        main=args.main,
        eta=args.eta,
        steps=args.steps,
        min_anchors=args.min_anchors,
        weights=weights if isinstance(weights, list) else None,
    )
    names = [m.name for m in ens.members]
    n_runs = len(names) * len(test) + len(test)
    if weights == "adaptive":
        n_runs += len(names) * len(split.dev)
    scores: list[Score] = []
    dev_scores: list[Score] = []
    with tqdm(total=n_runs, desc="deepen eval", file=sys.stderr) as bar:
        if weights == "adaptive":
            for i, name in enumerate(names):
                alone = _answerer(ens.with_fusion(main=i, eta=0), args.batch_size)
                dev_scores.append(
                    score(
                        f"{name} (dev)", alone, split.shots, split.dev, bar.update, args.batch_size
                    )
                )
            ens = ens.with_fusion(weights=adaptive_weights([s.accuracy for s in dev_scores]))
        for i, name in enumerate(names):
            alone = _answerer(ens.with_fusion(main=i, eta=0), args.batch_size)
            scores.append(score(name, alone, split.shots, test, bar.update, args.batch_size))
        label = f"ensemble (main {ens.main.name})"
        fused = _answerer(ens, args.batch_size)
        scores.append(score(label, fused, split.shots, test, bar.update, args.batch_size))

    output = Path(args.output)
    with output.open("w", encoding="utf-8") as f:
        for s in dev_scores + scores:
            for record in s.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
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
        "weight_mode": "adaptive"
        if weights == "adaptive"
        else ("explicit" if weights else "uniform"),
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
    print(f"capital-city QA, seed {args.seed}, {len(test)} test questions, {args.shots}-shot")
    print(f"weights {summary['weights']} ({summary['weight_mode']}), eta {ens.fusion.eta}, "
          f"steps {ens.fusion.steps}")  # fmt: skip
    for s in scores:
        low, high = s.interval
        print(
            f"  {s.system:40} {s.accuracy:6.1%}  [{low:.1%}, {high:.1%}]  ({s.correct}/{s.total})"
        )
    print(f"per-question outputs: {output}")
    return 0
