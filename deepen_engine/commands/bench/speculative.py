"""The `speculative` section of `deepen bench`: speculative fused decoding
(`GenerationConfig.speculate`, decoding/speculative.py) against standard decoding
(docs/benchmarks.md).

For each batch size and each kind (`greedy`; `sampled`: temperature 0.7, seed 0), `repeats`
rounds of runs on the bench's prompts (or an eval task's test prompts,
`--speculative-task`), exactly n tokens per row, interleaved so the machine's noise hits
all alike: the slower member alone (transformers `generate`, greedy, its KV cache), the
ensemble with `speculate=0`, and with `speculate=k` once per drafter compared
(`GenerationConfig.drafter`). Batches of more than `SchedulerConfig.speculate_max_rows`
rows take standard steps (`--speculate-max-rows 0`: no limit). One line per batch size,
kind and drafter, with medians over the rounds:

- `standard_tokens_per_s`, `speculative_tokens_per_s` and their ratio `speedup`;
- `acceptance_rate`: drafted tokens the fused distribution kept / drafted tokens;
- `mean_accepted_length`: kept drafted tokens per draft;
- `ratio_to_slower_member`: speculative ms/token / the slower member's alone;
  `ratio_to_slower_member_engine`: the same against the slower member run alone through
  deepen's own loop (`main=i, eta=0`), which applies the member's output layer the faster
  way on the CPU (members/output_layer.py) where `generate` does not;
- `same_tokens`: the speculative runs' token ids equal the standard runs' (greedy, and
  sampled with the same seed).
- `standard_decode_tokens_per_s`, `speculative_decode_tokens_per_s`, `decode_speedup`:
  the same after the first token. Each round also times the prompts with one new token
  (`first_token_s`: the prefill and the first fused step, which speculation does not
  change); a run's decode time is its time less that round's, over n - 1 tokens per row.
  The whole-request figures above include the prefill, which on long few-shot prompts
  (the eval tasks', `--speculative-task`) is a large share of 16 new tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...ensemble import Ensemble
from ..eval.task import split_questions
from ..eval.tasks import TASKS
from .sections import PROMPTS
from .timing import ensemble_run, member_alone

KINDS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sampled": {"temperature": 0.7, "seed": 0},
}


def speculative_cost(
    ens: Ensemble,
    batch_sizes: Sequence[int],
    n: int,
    k: int,
    repeats: int,
    tick: Callable[[], None],
    drafters: Sequence[int | str] = ("main",),
    prompts: Sequence[str] = PROMPTS,
    groups: int = 1,
) -> dict[str, Any]:
    """Figures of every batch size, kind and drafter (see the module docstring); each run
    at batch size b decodes `groups` batches of b `prompts` one after another (the first
    b * groups prompts, repeated when there are fewer).
    """
    rows = []
    for size in batch_sizes:
        chosen = [prompts[i % len(prompts)] for i in range(size * groups)]
        batches = [chosen[g * size : (g + 1) * size] for g in range(groups)]
        for kind, settings in KINDS.items():
            rows.extend(_one(ens, batches, n, k, repeats, kind, settings, drafters))
            tick()
    return {
        "new_tokens": n,
        "speculate": k,
        "speculate_max_rows": ens.scheduler_config.speculate_max_rows,
        "draft_precision": ens.scheduler_config.draft_precision,
        "rounds": repeats,
        "groups": groups,
        "drafters": list(drafters),
        "rows": rows,
    }


def task_prompts(name: str, count: int = 16) -> list[str]:
    """The first `count` test prompts of eval task `name`, as `deepen eval` builds them with
    its defaults (seed 0, 4 shots, 50 dev questions).
    """
    task = TASKS[name]
    split = split_questions(task.load(), seed=0)
    return [task.prompt(split.shots, q) for q in split.test[:count]]


def _one(
    ens: Ensemble,
    batches: list[list[str]],
    n: int,
    k: int,
    repeats: int,
    kind: str,
    settings: dict[str, Any],
    drafters: Sequence[int | str],
) -> list[dict[str, Any]]:
    tokens = n * sum(len(b) for b in batches)
    for drafter in drafters:  # warm up
        ens.generate(batches[0], max_new_tokens=2, speculate=k, drafter=drafter, **settings)
    runs_of = [("standard", 0, "main")] + [(f"drafter {d}", k, d) for d in drafters]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in runs_of}
    seconds["slower"] = []
    seconds["slower_engine"] = []
    seconds["first"] = []  # one new token: the prefill and the first step
    alone = [ens.with_fusion(main=i, eta=0) for i in range(len(ens.members))]
    counts = {d: [0, 0, 0, 0] for d in drafters}  # drafted, accepted, drafts, re-syncs
    same = dict.fromkeys(drafters, True)
    for _ in range(repeats):
        seconds["slower"].append(
            max(sum(member_alone(m, b, n, warm_up=False)[-1] for b in batches) for m in ens.members)
        )
        seconds["slower_engine"].append(
            max(sum(ensemble_run(one, b, n)["seconds"] for b in batches) for one in alone)
        )
        start = time.perf_counter()
        for b in batches:
            ens.generate(b, max_new_tokens=1, speculate=0, **settings)
        seconds["first"].append(time.perf_counter() - start)
        runs = {}
        for name, spec, drafter in runs_of:
            start = time.perf_counter()
            runs[name] = [
                r
                for b in batches
                for r in ens.generate(
                    b,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    speculate=spec,
                    drafter=drafter,
                    **settings,
                )
            ]
            seconds[name].append(time.perf_counter() - start)
        standard_ids = [r.token_ids for r in runs["standard"]]
        for d in drafters:
            for r in runs[f"drafter {d}"]:
                counts[d][0] += r.usage.drafted_tokens
                counts[d][1] += r.usage.accepted_tokens
                counts[d][2] += r.usage.drafts
                counts[d][3] += r.usage.resyncs
            same[d] = same[d] and standard_ids == [r.token_ids for r in runs[f"drafter {d}"]]
    med = {name: statistics.median(v) for name, v in seconds.items()}
    # after the first token: each run's time less its round's one-token time
    decode = {
        name: statistics.median(t - f for t, f in zip(seconds[name], seconds["first"]))
        for name in ("standard", *(f"drafter {d}" for d in drafters))
    }
    after_first = (n - 1) * sum(len(b) for b in batches)
    out = []
    for d in drafters:
        spec_s = med[f"drafter {d}"]
        drafted, accepted, drafts, resyncs = counts[d]
        row: dict[str, Any] = {
            "batch_size": len(batches[0]),
            "kind": kind,
            "drafter": d,
            "standard_tokens_per_s": round(tokens / med["standard"], 2),
            "speculative_tokens_per_s": round(tokens / spec_s, 2),
            "speedup": round(med["standard"] / spec_s, 3),
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "mean_accepted_length": round(accepted / drafts, 2) if drafts else None,
            "resyncs": resyncs,  # helpers re-synced inside a draft (speculative.py step 5)
            "ratio_to_slower_member": round(spec_s / med["slower"], 3),
            "standard_ratio_to_slower_member": round(med["standard"] / med["slower"], 3),
            "ratio_to_slower_member_engine": round(spec_s / med["slower_engine"], 3),
        }
        decode_s = (decode["standard"], decode[f"drafter {d}"])
        usable = after_first > 0 and min(decode_s) > 0
        row["first_token_s"] = round(med["first"], 3)
        row["standard_decode_tokens_per_s"] = (
            round(after_first / decode_s[0], 2) if usable else None
        )
        row["speculative_decode_tokens_per_s"] = (
            round(after_first / decode_s[1], 2) if usable else None
        )
        row["decode_speedup"] = round(decode_s[0] / decode_s[1], 3) if usable else None
        row["same_tokens"] = same[d]  # sampled too: same seeds, same numbers (sampling.py)
        out.append(row)
    return out


def speculative_table(f: dict[str, Any]) -> str:
    """Standard against speculative decoding, one line per batch size and kind."""
    s = f["speculative"]
    lines = [
        f"speculative decoding, speculate={s['speculate']}, {s['new_tokens']} new tokens, "
        f"speculate_max_rows={s['speculate_max_rows']}, draft_precision="
        f"{s.get('draft_precision', 'float32')} (medians of {s['rounds']} interleaved rounds)",
        f"{'batch':>5} {'kind':8}{'drafter':>8}{'std tok/s':>10}{'spec tok/s':>11}{'speedup':>8}"
        f"{'accept':>8}{'mean len':>9}{'spec/slower':>12}{'(engine)':>9}{'decode':>8}"
        f"{'same':>6}",
    ]
    for r in s["rows"]:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        decode = "-" if r.get("decode_speedup") is None else f"{r['decode_speedup']:.2f}"
        length = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        lines.append(
            f"{r['batch_size']:>5} {r['kind']:8}{r.get('drafter', 'main')!s:>8}"
            f"{r['standard_tokens_per_s']:>10.2f}"
            f"{r['speculative_tokens_per_s']:>11.2f}{r['speedup']:>8.2f}{rate:>8}{length:>9}"
            f"{r['ratio_to_slower_member']:>12.2f}{r['ratio_to_slower_member_engine']:>9.2f}"
            f"{decode:>8}{str(r.get('same_tokens', '-')):>6}"
        )
    return "\n".join(lines)
