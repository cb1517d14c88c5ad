"""Do weights fitted to the prompt (PackLLM-opt's idea) beat the default prompt weights?

PackLLM-opt (arXiv 2404.11531) chooses the fusion weights that minimise the fused model's
perplexity of the prompt. Across tokenizers, this measures the nearest thing that costs
nothing at run time: the prompt's text is cut at the byte offsets where both members'
tokenisations have a token boundary, each member's log-probability of each piece is the
sum over its own tokens in it (one forward of the prompt per member), and the weight `w`
of member 0 minimises the mixture's negative log-likelihood of the pieces,
`-sum log(w p_0(piece) + (1 - w) p_1(piece))`, over a grid of 101 values, on the
prompt's second half (the span the default scores, `prompt_score="second-half"`).

On each task's dev questions (the split `deepen eval` uses), greedy as `deepen eval`:
the default ensemble (leader and weights from the prompt scores, T = 0.03) against the
same ensemble with the fitted weights (`weighting="fixed"`, the leader still the member
that reads the prompt best). Prints each task's accuracies and the fitted weights'
spread; `--json` writes them.

    HF_HUB_OFFLINE=1 python scripts/prompt_opt.py --seed 0 --json docs/prompt-opt-seed0.json
"""

from __future__ import annotations

import argparse
import json
import math
from statistics import mean, median
from typing import Any

import torch

from deepen_engine import Ensemble
from deepen_engine.commands.eval.systems import answerer
from deepen_engine.commands.eval.task import Question, Task, split_questions
from deepen_engine.commands.eval.tasks import TASKS

GRID = [i / 100 for i in range(101)]


def _token_log_probs(member: Any, prompt: str) -> list[tuple[int, int, float]]:
    """(start byte, end byte, log-probability) of each of the member's prompt tokens that
    has text, from one forward (the first token has no prediction and is left out).
    """
    ids = member.tokenizer(prompt).input_ids
    with torch.no_grad():
        logits = member.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])
    texts = member.vocab.texts
    out, at = [], 0
    for t, token in enumerate(ids):
        text = texts[token] if token < len(texts) else None
        if not text:
            continue
        if t >= 1:
            out.append((at, at + len(text), float(logp[t - 1])))
        at += len(text)
    return out


def _pieces(tokens: list[list[tuple[int, int, float]]], start: int) -> list[list[float]]:
    """Per piece of text between consecutive common boundaries at or after byte `start`:
    each member's log-probability of it.
    """
    ends = [{e for _, e, _ in member} | {s for s, _, _ in member} for member in tokens]
    common = sorted(b for b in set.intersection(*ends) if b >= start)
    pieces = []
    for lo, hi in zip(common, common[1:]):
        pieces.append([sum(lp for s, e, lp in member if s >= lo and e <= hi) for member in tokens])
    return pieces


def fitted_weight(pieces: list[list[float]]) -> float:
    """Member 0's weight minimising the two-member mixture's NLL of the pieces (the first
    of equal values on the grid); 0.5 without pieces.
    """
    if not pieces:
        return 0.5

    def nll(w: float) -> float:
        total = 0.0
        for a, b in pieces:
            terms = [math.log(w) + a if w > 0 else -math.inf]
            terms.append(math.log(1 - w) + b if w < 1 else -math.inf)
            top = max(terms)
            total -= top + math.log(sum(math.exp(x - top) for x in terms))
        return total

    return min(GRID, key=nll)


def _run(
    ens: Ensemble, task: Task, shots: list[Question], dev: list[Question], batch: int
) -> dict[str, Any]:
    """The default and the fitted weights on one task's dev questions."""
    prompts = [task.prompt(shots, q) for q in dev]
    default = answerer(ens, task, batch)(prompts)
    weights = []
    for prompt in prompts:
        middle = len(prompt.encode()) / 2
        tokens = [_token_log_probs(m, prompt) for m in ens.members]
        start = min((s for s, _, _ in tokens[0] if s >= middle), default=len(prompt.encode()))
        weights.append(fitted_weight(_pieces(tokens, start)))
    fitted: list[str] = [""] * len(prompts)
    for w in sorted(set(weights)):
        at = [i for i, x in enumerate(weights) if x == w]
        view = ens.with_fusion(weighting="fixed", weights=[w, 1 - w])
        for i, text in zip(at, answerer(view, task, batch)([prompts[i] for i in at])):
            fitted[i] = text
    right = [
        (task.check(d, q.answers), task.check(f, q.answers))
        for d, f, q in zip(default, fitted, dev)
    ]
    return {
        "questions": len(dev),
        "default_correct": sum(d for d, _ in right),
        "fitted_correct": sum(f for _, f in right),
        "fitted_only": sum(f and not d for d, f in right),
        "default_only": sum(d and not f for d, f in right),
        "weight_member0": {
            "mean": round(mean(weights), 3),
            "median": median(weights),
            "min": min(weights),
            "max": max(weights),
        },
    }


def main() -> int:
    """Run both systems on the tasks' dev questions; print and optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=None, help="most dev questions per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    ens = Ensemble()
    figures: dict[str, Any] = {"members": [m.name for m in ens.members], "tasks": {}}
    for name in args.task:
        task = TASKS[name]
        split = split_questions(task.load(), args.seed)
        dev = split.dev[: args.n] if args.n else split.dev
        result = _run(ens, task, split.shots, dev, args.batch_size)
        figures["tasks"][name] = result
        print(name, json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
