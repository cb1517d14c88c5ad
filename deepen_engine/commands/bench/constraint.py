"""The `constraint` section of `deepen bench`: what a JSON-schema constraint costs per
token (docs/constraints.md, docs/benchmarks.md).

For each main member asked for (its vocabulary is the one masked: Gemma-3's 262k or
SmolLM2's 49k ids for the default pair), `repeats` rounds of three runs of the same prompt,
exactly n tokens each, interleaved so the machine's noise hits all alike:

- `json_schema`: `Ensemble.generate(prompt, json_schema=SCHEMA, max_new_tokens=n)`; the
  schema (an array of at least n strings) cannot close within n tokens, so the row runs
  exactly n tokens and ends with `"length"`;
- `free`: no constraint, `min_new_tokens=n`;
- `any_text`: the constraint `regex=[\\s\\S]*` (any text), `min_new_tokens=n`: every step
  computes and applies a mask, yet greedy decoding chooses the free run's tokens (checked:
  `same_tokens`), so `any_text / free - 1` is the constraint machinery's cost on the same
  text, with nothing else changed.

`json_schema / free - 1` also carries the effect of writing other text: the helpers re-read
JSON text differently (`helper_positions_per_token`: positions each helper feeds per
generated token, from `Usage.fed_positions`), and where each kind's last run spent its
time (`forward_ms_per_token`: the members' forward passes; `fusion_ms_per_token`: fusion,
masks, sampling and sync, from `Usage`). `mask_ms` is the mask work alone (computing
one row's mask with llguidance, unpacking it and masking the fused logits, advancing the
matcher; median over the steps of one JSON walk).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...decoding.constraints import RowConstraint, apply_masks, constraint_vocab
from ...ensemble import Ensemble
from ...grammar import check_constraint
from ...outputs import GenerationResult

ANY_TEXT = r"[\s\S]*"
PROMPT = "Write a long list of short sentences about the sea, as a JSON array of strings:"


def schema(n: int) -> dict[str, Any]:
    """A JSON schema whose instances need more than `n` tokens."""
    return {"type": "array", "items": {"type": "string"}, "minItems": n}


def constraint_cost(
    ens: Ensemble, mains: Sequence[int], n: int, repeats: int, tick: Callable[[], None]
) -> dict[str, Any]:
    """Per main member: median ms/token of each kind of run, the overheads, the helpers'
    positions per token, and the mask's own ms per token.
    """
    return {
        "new_tokens": n,
        "prompt": PROMPT,
        "rows": [_one_main(ens.with_fusion(main=m), n, repeats, tick) for m in mains],
    }


def _one_main(view: Ensemble, n: int, repeats: int, tick: Callable[[], None]) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {
        "json_schema": {"json_schema": schema(n)},
        "free": {"min_new_tokens": n},
        "any_text": {"regex": ANY_TEXT, "min_new_tokens": n},
    }
    view.generate(PROMPT, max_new_tokens=2, json_schema=schema(n))  # builds the vocab view
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    results: dict[str, GenerationResult] = {}
    for _ in range(repeats):
        for kind, settings in kinds.items():
            start = time.perf_counter()
            results[kind] = view.generate(PROMPT, max_new_tokens=n, **settings)
            seconds[kind].append((time.perf_counter() - start) / n)
            assert len(results[kind].token_ids) == n, (kind, results[kind].finish_reason)
        tick()
    ms = {k: statistics.median(v) * 1e3 for k, v in seconds.items()}
    helpers = [m.name for m in view.members if m is not view.main]
    return {
        "main": view.main.name,
        "vocab": len(view.main.vocab),
        **{f"{k}_ms_per_token": round(v, 1) for k, v in ms.items()},
        "overhead_json_schema": round(ms["json_schema"] / ms["free"] - 1, 4),
        "overhead_any_text": round(ms["any_text"] / ms["free"] - 1, 4),
        "same_tokens": results["any_text"].token_ids == results["free"].token_ids,
        "helper_positions_per_token": {
            k: round(sum(r.usage.fed_positions[h] for h in helpers) / n, 2)
            for k, r in results.items()
        },
        # the last run of each kind: where its time went (member forwards, the rest)
        "forward_ms_per_token": {
            k: round(sum(r.usage.forward_seconds.values()) / n * 1e3, 1) for k, r in results.items()
        },
        "fusion_ms_per_token": {
            k: round(r.usage.fusion_seconds / n * 1e3, 1) for k, r in results.items()
        },
        "mask_ms_per_token": round(mask_ms(view, n), 3),
        "runs_each": repeats,
    }


def mask_ms(view: Ensemble, n: int) -> float:
    """Median ms of one constrained row's mask work per token: llguidance's mask, the
    engine's masking of the (1, V) fused logits, and the matcher's advance.
    """
    member = view.main
    row = RowConstraint(check_constraint("json_schema", schema(n)), constraint_vocab(member))
    logits = torch.randn(1, len(member.vocab))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        masked = apply_masks(logits, [row])
        token = int(masked.argmax())
        row.advance(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
