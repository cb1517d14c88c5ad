"""The sections of `deepen bench` (each a key of its JSON output; docs/benchmarks.md
describes every field): `speed`, `length`, `memory`, `fidelity`. See command.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...decoding.rows import StepRecord
from ...ensemble import Ensemble
from ...fusion import DeepenFuser
from ...fusion.deepen import kept_non_anchors
from ...fusion.reference import ReferenceFuser
from .timing import (
    ensemble_run,
    kv_cache_mb,
    member_alone,
    peak_rss_mb,
    tensor_mb,
    timed_decode,
)

WINDOW = 8  # steps averaged for the ms/token at one length

PROMPTS = (
    "The history of the city of Paris begins",
    "Once upon a time, in a small village by the sea,",
    "The main causes of the French Revolution were",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    ",
    "Q: What is the capital of Japan?\nA:",
    "The three laws of motion describe",
    "In 1969, the first humans to walk on the Moon",
)


def _prompts(size: int) -> list[str]:
    """The first `size` benchmark prompts (cycling through them past 8)."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(size)]


# --- timing helpers -------------------------------------------------------------------


def speed(
    ens: Ensemble, n: int, batch_sizes: Sequence[int], tick: Callable[[], None]
) -> dict[str, Any]:
    """Ms per decoding step for each member alone and the ensemble, per batch size.

    A first ensemble run over the largest batch's prompts fills the relative-row caches,
    so the table's ensemble figures are the steady state of a long-lived process; that
    first run is reported on its own as `cold_run`.
    """
    largest = _prompts(max(batch_sizes))
    before = _row_counts(ens)
    cold = ensemble_run(ens, largest, n)
    cold_rows = {k: v - before[k] for k, v in _row_counts(ens).items()}
    tick()
    rows = []
    warm_ms = 0.0  # set at the largest batch size, the cold run's
    for size in batch_sizes:
        prompts = _prompts(size)
        alone = {}
        for m in ens.members:
            alone[m.name] = member_alone(m, prompts, n)[-1] * 1000 / n
            tick()
        run = ensemble_run(ens, prompts, n)
        tick()
        total = sum(alone.values())
        ms = run["seconds"] * 1000 / n
        if size == len(largest):
            warm_ms = ms  # the same prompts as the cold run
        rows.append(
            {
                "batch_size": size,
                "new_tokens": n,
                "members_alone_ms": {k: round(v, 2) for k, v in alone.items()},
                "sum_of_members_ms": round(total, 2),
                "ensemble_ms": round(ms, 2),
                "ratio_ensemble_to_sum": round(ms / total, 3),
                "ensemble_forward_ms": round(run["forward_seconds"] * 1000 / n, 2),
                "fusion_only_ms": round(run["fusion_seconds"] * 1000 / n, 2),
                "fusion_only_share": round(run["fusion_seconds"] / run["seconds"], 4),
                "fuse_ms": round(run["fuse_seconds"] * 1000 / n, 2),
                "fuse_share": round(run["fuse_seconds"] / run["seconds"], 4),
                "ensemble_tokens_per_second": round(run["tokens"] / run["seconds"], 2),
            }
        )
    cold_ms = cold["seconds"] * 1000 / n
    return {
        "cold_run": {
            "batch_size": len(largest),
            "ensemble_ms": round(cold_ms, 2),
            "fusion_only_ms": round(cold["fusion_seconds"] * 1000 / n, 2),
            "fusion_only_share": round(cold["fusion_seconds"] / cold["seconds"], 4),
            "cold_over_warm": round(cold_ms / warm_ms, 3),
            **cold_rows,
        },
        "rows": rows,
    }


def _row_counts(ens: Ensemble) -> dict[str, int]:
    """Relative rows of non-anchor tokens computed so far, and read from the disk cache."""
    spaces = ens.fuser.spaces if isinstance(ens.fuser, DeepenFuser) else []
    return {
        "rows_computed": sum(s.rows_computed for s in spaces),
        "rows_from_disk": sum(s.store.loaded for s in spaces if s.store is not None),
    }


def gate_check(
    ens: Ensemble, prompts: Sequence[str], n: int, tick: Callable[[], None]
) -> dict[str, Any]:
    """For every method, greedy runs with the gate off, `agree` and `confident`: how often
    the gate skips fusion, the fusion time it saves, and whether the text stays the same.
    """
    out = []
    for method in ("deepen", "union", "unite"):
        runs = {}
        for gate in ("off", "agree", "confident"):
            view = ens.with_fusion(method=method, gate=gate)
            results = view.generate(list(prompts), max_new_tokens=n, min_new_tokens=n, speculate=0)
            stats = view.fuser.stats
            runs[gate] = (stats, [r.token_ids for r in results])
            tick()
        off_stats, off_ids = runs["off"]
        for gate, (stats, ids) in runs.items():
            out.append(
                {
                    "method": method,
                    "gate": gate,
                    "threshold": ens.fusion.gate_threshold if gate == "confident" else None,
                    "row_steps": stats.rows,
                    "gated_share": round(stats.gated / stats.rows, 4) if stats.rows else None,
                    "fuse_ms_per_row_step": round(stats.seconds * 1000 / stats.rows, 3)
                    if stats.rows
                    else None,
                    "fuse_seconds_saved_share": round(1 - stats.seconds / off_stats.seconds, 4)
                    if off_stats.seconds
                    else None,
                    "rows_same_tokens_as_off": sum(a == b for a, b in zip(ids, off_ids)),
                    "rows": len(ids),
                }
            )
    return {"prompts": len(prompts), "new_tokens": n, "runs": out}


def length_curve(ens: Ensemble, n: int, tick: Callable[[], None]) -> dict[str, Any]:
    """Ms per token at each length, batch 1: ensemble, members alone, re-encoding baseline.

    The ensemble generates n tokens once, noting when each token comes; its cost at
    length L is the mean of steps L-7..L. The members alone and the re-encoding baseline
    are timed on the same windows, each resumed from the ensemble's text before the window
    (a full baseline run takes many minutes: its step cost grows with the text). The
    baseline must choose the ensemble's very tokens; that is checked.
    """
    prompt = PROMPTS[0]
    ens_ids, ens_times = timed_decode(ens, prompt, n, min_new_tokens=n)
    tick()
    texts = ens.main.vocab.texts
    points = sorted({x for x in (16, 32, 64, 128, 256, 512, 1024, 2048) if x < n} | {n})

    def ms_at(times: list[float], length: int) -> float:
        return (times[length - 1] - times[length - 1 - WINDOW]) * 1000 / WINDOW

    curve = []
    same = True
    for length in points:
        start = length - WINDOW - 1  # tokens before the timed window (+1: its first step)
        prefix = ens_ids[:start]
        text = b"".join(texts[t] or b"" for t in prefix).decode("utf-8", errors="replace")
        alone_ms = sum(
            ms_at(member_alone(m, [prompt + text], WINDOW + 1, warm_up=length == points[0]),
                  WINDOW + 1)
            for m in ens.members
        )  # fmt: skip
        base_ids, base_times = timed_decode(
            ens, prompt, WINDOW + 1, reencode=True, min_new_tokens=n, resume=prefix
        )
        same = same and base_ids == ens_ids[start:length]
        curve.append(
            {
                "new_tokens": length,
                "ensemble_ms": round(ms_at(ens_times, length), 2),
                "reencode_baseline_ms": round(ms_at(base_times, WINDOW + 1), 2),
                "sum_of_members_ms": round(alone_ms, 2),
            }
        )
    tick()
    speedups = {
        str(p["new_tokens"]): round(p["reencode_baseline_ms"] / p["ensemble_ms"], 2)
        for p in curve
        if p["new_tokens"] in (128, n)
    }
    return {
        "prompt": prompt,
        "window": WINDOW,
        "curve": curve,
        "speedup_over_reencode": speedups,
        "baseline_same_tokens_as_ensemble": same,
    }


def memory(ens: Ensemble, rss_before_load: float, largest: tuple[int, int]) -> dict[str, Any]:
    """Peak resident memory against what the ensemble must hold."""
    batch, positions = largest
    weights = {
        m.name: tensor_mb(list(m.model.parameters()) + list(m.model.buffers())) for m in ens.members
    }
    caches = {m.name: kv_cache_mb(m, batch, positions) for m in ens.members}
    spaces = ens.fuser.spaces if isinstance(ens.fuser, DeepenFuser) else []
    relative = sum(s.memory_bytes() for s in spaces) / 2**20
    accounted = sum(weights.values()) + sum(caches.values()) + relative
    peak = peak_rss_mb()
    figures = _cuda_memory(ens)
    return figures | {
        "rss_before_load_mb": round(rss_before_load, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_above_start_mb": round(peak - rss_before_load, 1),
        "weights_mb": {k: round(v, 1) for k, v in weights.items()},
        "kv_cache_mb_largest_run": {k: round(v, 1) for k, v in caches.items()},
        "largest_run": {"batch_size": batch, "positions": positions},
        "relative_space_mb": round(relative, 1),
        "weights_caches_relative_mb": round(accounted, 1),
        "peak_above_start_over_accounted": round((peak - rss_before_load) / accounted, 3),
    }


def _cuda_memory(ens: Ensemble) -> dict[str, Any]:
    """Peak GPU memory torch allocated on each member's GPU since the process started
    (weights, caches and relative spaces live there; the RSS figures do not see it).
    """
    gpus = sorted({str(m.device) for m in ens.members if m.device.type == "cuda"})
    if not gpus:
        return {}
    peaks = {d: torch.cuda.max_memory_allocated(torch.device(d)) / 2**20 for d in gpus}
    return {"cuda_peak_allocated_mb": {d: round(v, 1) for d, v in peaks.items()}}


def fidelity(
    ens: Ensemble, prompts: Sequence[str], n: int, leftout_mass: float, tick: Callable[[], None]
) -> dict[str, Any]:
    """Share of steps where the fast path's token equals the reference fusion's token.

    Only DeePEn has a fast path to check: the union methods compute their formula whole.
    """
    fuser = ens.fuser
    if not isinstance(fuser, DeepenFuser) or not prompts:
        return {"method": fuser.method, "prompts": 0, "steps": 0, "disagreements": []}
    reference = ReferenceFuser(fuser, leftout_mass=leftout_mass)
    main = ens.main
    steps = agree = 0
    worst_leftout = [0.0] * len(ens.members)
    rows_used = [0] * len(ens.members)
    fast_leftout: list[list[float]] = [[] for _ in ens.members]
    disagreements = []
    margins: list[float] = []  # per step: the reference's best logit minus its second
    for p, prompt in enumerate(prompts):

        def check(record: StepRecord, p: int = p) -> None:
            nonlocal steps, agree
            logits = [x[0] for x in record.logits]  # batch 1: row 0 of each member
            token = record.tokens[0]
            weights = None if record.weights is None else record.weights[0]
            ref = reference.fuse_row(logits, weights)
            top2 = ref.logits.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            ref_token = int(ref.logits.argmax())
            steps += 1
            if ref_token == token:
                agree += 1
            else:
                disagreements.append(
                    {
                        "prompt": p,
                        "fast": main.tokenizer.decode([token]),
                        "reference": main.tokenizer.decode([ref_token]),
                        # how far the reference put the fast path's token below its own
                        "reference_gap": float(ref.logits[ref_token] - ref.logits[token]),
                    }
                )
            for i, (left, used) in enumerate(zip(ref.leftout_mass, ref.rows_used)):
                worst_leftout[i] = max(worst_leftout[i], left)
                rows_used[i] = max(rows_used[i], used)
                fast_leftout[i].append(_fast_path_leftout(logits[i], fuser, i))

        timed_decode(ens, prompt, n, on_step=check)
        tick()
    return {
        "prompts": len(prompts),
        "steps": steps,
        "agreeing_steps": agree,
        "agreement": round(agree / steps, 4) if steps else None,
        "method": fuser.method,
        "top_k": ens.fusion.top_k,
        "top_mass": ens.fusion.top_mass,
        "candidates": ens.fusion.candidates,
        "leftout_mass_bound": leftout_mass,
        "max_leftout_mass": {m.name: worst_leftout[i] for i, m in enumerate(ens.members)},
        "fast_path_leftout_mass": {
            m.name: {
                "mean": sum(fast_leftout[i]) / len(fast_leftout[i]) if fast_leftout[i] else None,
                "max": max(fast_leftout[i], default=None),
            }
            for i, m in enumerate(ens.members)
        },
        "max_non_anchor_rows_per_step": {m.name: rows_used[i] for i, m in enumerate(ens.members)},
        "closest_reference_margins": sorted(margins)[:5],
        "disagreements": disagreements,
    }


def _fast_path_leftout(logits: torch.Tensor, fuser: DeepenFuser, i: int) -> float:
    """Probability (of member i's tokens with text) the fast path leaves out: non-anchor
    tokens past its mass bound or its cap (`kept_non_anchors`).
    """
    space = fuser.spaces[i]  # on member i's device, as its logits
    probs = torch.softmax(logits.float().to(space.device), dim=-1)
    probs = torch.where(fuser.on(fuser.has_text[i], space.device), probs, 0.0)
    is_anchor = space.token_to_anchor >= 0
    cfg = fuser.config
    _, _, leftout = kept_non_anchors(probs[None], is_anchor, cfg.top_k, cfg.top_mass)
    return float(leftout[0] / probs.sum())


# --- plot and command -----------------------------------------------------------------
