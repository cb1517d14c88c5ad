"""The `constraint` section of `deepen bench`: what a JSON-schema constraint costs per
token (docs/constraints.md, docs/benchmarks.md).

For each main member asked for (its vocabulary is the one masked: Gemma-3's 262k or
SmolLM2's 49k ids for the default pair), `repeats` pairs of runs, interleaved so the
machine's noise hits both alike:

- constrained: `Ensemble.generate(prompt, json_schema=SCHEMA, max_new_tokens=n)`; the
  schema (an array of at least `n` strings) cannot close within n tokens, so the row runs
  exactly n tokens and ends with `"length"`;
- free: the same prompt, `min_new_tokens=n`, no constraint: exactly n tokens.

Figures: median ms per token of each kind, the overhead `constrained / free - 1`, and the
engine's own mask work alone (`mask_ms`: computing one row's mask with llguidance,
unpacking it and masking the fused logits, plus advancing the matcher; median over every
step of one constrained walk), which is what the overhead is made of.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..decoding.constraints import (
    RowConstraint,
    apply_masks,
    check_constraint,
    constraint_vocab,
)
from ..ensemble import Ensemble

PROMPT = "Write a long list of short sentences about the sea, as a JSON array of strings:"


def schema(n: int) -> dict[str, Any]:
    """A JSON schema whose instances need more than `n` tokens."""
    return {"type": "array", "items": {"type": "string"}, "minItems": n}


def constraint_cost(
    ens: Ensemble, mains: Sequence[int], n: int, repeats: int, tick: Callable[[], None]
) -> dict[str, Any]:
    """Per main member: ms/token constrained and free (medians), the overhead, and the
    mask's own ms per token.
    """
    rows = []
    for main in mains:
        view = ens.with_fusion(main=main)
        view.generate(PROMPT, max_new_tokens=2, json_schema=schema(n))  # builds the vocab view
        constrained, free = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            got = view.generate(PROMPT, max_new_tokens=n, json_schema=schema(n))
            constrained.append((time.perf_counter() - start) / len(got.token_ids))
            assert got.finish_reason == "length" and len(got.token_ids) == n
            start = time.perf_counter()
            got = view.generate(PROMPT, max_new_tokens=n, min_new_tokens=n)
            free.append((time.perf_counter() - start) / len(got.token_ids))
            tick()
        c_ms, f_ms = statistics.median(constrained) * 1e3, statistics.median(free) * 1e3
        rows.append(
            {
                "main": view.main.name,
                "vocab": len(view.main.vocab),
                "constrained_ms_per_token": round(c_ms, 1),
                "free_ms_per_token": round(f_ms, 1),
                "overhead": round(c_ms / f_ms - 1, 4),
                "mask_ms_per_token": round(mask_ms(view, n), 3),
                "runs_each": repeats,
            }
        )
    return {"new_tokens": n, "prompt": PROMPT, "rows": rows}


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
