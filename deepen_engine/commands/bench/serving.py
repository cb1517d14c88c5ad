"""`deepen bench --serving`: many users at once, through the scheduler (continuous
batching) and one at a time, on the same workload in the same run.

The workload (fixed by `--seed`): N requests with prompts of mixed length and outputs of
mixed length (each exactly L tokens, L drawn from `--serving-tokens MIN MAX`), arriving at
random times (a Poisson process of `--arrival-rate` requests per second). Each load is run
twice on the same ensemble (`--repeat R` runs both R times, interleaved, and reports
medians):

- `batched`: every request is sent when it arrives; the scheduler lets waiting rows join
  the running batch between steps;
- `one_at_a_time`: a request starts only when the previous one has finished (as a lock
  around the ensemble would do), arrivals unchanged.

Figures per run: output tokens per second (all completion tokens / time from the first
arrival to the last completion), time to first token (arrival to first text) p50/p95,
time per output token after the first p50/p95, and how many requests completed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...ensemble import Ensemble

_PROMPTS = (
    "Q: What is the capital of Japan?\nA:",
    "Write one sentence about the sea.",
    "The history of the city of Paris begins",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "every morning walked down to the harbour before sunrise and",
    "Photosynthesis is the process by which plants turn light, water and carbon dioxide "
    "into sugar and oxygen. The first stage of it",
    "def fibonacci(n):\n    ",
    "The three laws of motion describe how a body moves when forces act on it. The first "
    "law says that a body keeps its state of rest or of uniform motion unless",
    "In 1969, the first humans to walk on the Moon",
)


@dataclass
class Job:
    """One request of the workload."""

    arrival: float  # seconds after the start
    prompt: str
    tokens: int  # exactly this many new tokens


def workload(n: int, tokens: tuple[int, int], rate: float, seed: int) -> list[Job]:
    """N requests with seeded prompts, output lengths and Poisson arrival times."""
    rng = random.Random(seed)
    clock, jobs = 0.0, []
    for _ in range(n):
        jobs.append(Job(clock, rng.choice(_PROMPTS), rng.randint(*tokens)))
        clock += rng.expovariate(rate)
    return jobs


async def _run(ens: Ensemble, jobs: Sequence[Job], one_at_a_time: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()
    start = loop.time()
    records: list[tuple[float, float, float, int]] = []  # arrival, first text, end, tokens

    async def serve(job: Job) -> None:
        await asyncio.sleep(max(0.0, job.arrival - (loop.time() - start)))
        arrived = loop.time()
        if one_at_a_time:
            async with lock:
                records.append(await _one(ens, job, arrived, loop))
        else:
            records.append(await _one(ens, job, arrived, loop))

    await asyncio.gather(*(serve(job) for job in jobs))
    return _figures(records, len(jobs), start)


async def _one(
    ens: Ensemble, job: Job, arrived: float, loop: asyncio.AbstractEventLoop
) -> tuple[float, float, float, int]:
    first = None
    tokens = 0
    async for event in ens.astream(
        job.prompt, max_new_tokens=job.tokens, min_new_tokens=job.tokens
    ):
        if first is None and event.delta:
            first = loop.time()
        if event.usage is not None:
            tokens = event.usage.completion_tokens
    end = loop.time()
    return arrived, first if first is not None else end, end, tokens


def _figures(
    records: list[tuple[float, float, float, int]], asked: int, start: float
) -> dict[str, Any]:
    ttft = [first - arrived for arrived, first, _, _ in records]
    tpot = [(end - first) / (n - 1) for _, first, end, n in records if n > 1]
    wall = max(end for _, _, end, _ in records) - start
    tokens = sum(n for *_, n in records)
    return {
        "requests": asked,
        "completed": len(records),
        "output_tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_ms_p50": round(_quantile(ttft, 0.5) * 1000, 1),
        "ttft_ms_p95": round(_quantile(ttft, 0.95) * 1000, 1),
        "tpot_ms_p50": round(_quantile(tpot, 0.5) * 1000, 1),
        "tpot_ms_p95": round(_quantile(tpot, 0.95) * 1000, 1),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def serving(
    ens: Ensemble,
    concurrency: Sequence[int],
    tokens: tuple[int, int],
    rate: float,
    seed: int,
    tick: Any = None,
    repeat: int = 1,
) -> dict[str, Any]:
    """Both runs for each N in `concurrency`, `repeat` times interleaved (batched, one at a
    time, batched, ...); each figure is the median over the repeats, and the speed-up the
    median of the repeats' own speed-ups.
    """
    ens.generate(_PROMPTS[0], max_new_tokens=4)  # warm: the first request pays cold costs
    rows = []
    for n in concurrency:
        jobs = workload(n, tokens, rate, seed)
        started = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {"batched": [], "one_at_a_time": []}
        for _ in range(repeat):
            runs["batched"].append(asyncio.run(_run(ens, jobs, one_at_a_time=False)))
            runs["one_at_a_time"].append(asyncio.run(_run(ens, jobs, one_at_a_time=True)))
        speedups = [
            b["tokens_per_second"] / s["tokens_per_second"]
            for b, s in zip(runs["batched"], runs["one_at_a_time"])
        ]
        rows.append(
            {
                "concurrency": n,
                "batched": _median_run(runs["batched"]),
                "one_at_a_time": _median_run(runs["one_at_a_time"]),
                "speedup_tokens_per_second": round(statistics.median(speedups), 2),
                "speedups": [round(x, 2) for x in speedups],
                "section_seconds": round(time.perf_counter() - started, 1),
            }
        )
        if tick is not None:
            tick()
    return {
        "arrival_rate_per_second": rate,
        "output_tokens": list(tokens),
        "seed": seed,
        "max_batch_size": ens.scheduler_config.max_batch_size,
        "repeat": repeat,
        "rows": rows,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeated runs of one workload."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = round(statistics.median(r[key] for r in runs), 2)
    out["completed"] = min(r["completed"] for r in runs)  # a request lost in any run shows
    return out


def print_serving(figures: dict[str, Any]) -> None:
    """The serving table."""
    s = figures["serving"]
    print(
        f"serving: {s['output_tokens'][0]}-{s['output_tokens'][1]} new tokens per request, "
        f"{s['arrival_rate_per_second']} arrivals/s, seed {s['seed']}, "
        f"max batch {s['max_batch_size']}, median of {s['repeat']} interleaved runs"
    )
    print(
        f"{'N':>4} {'mode':<14} {'done':>5} {'tok/s':>8} {'TTFT p50':>9} {'p95':>8} "
        f"{'TPOT p50':>9} {'p95':>8}"
    )
    for row in s["rows"]:
        for mode in ("batched", "one_at_a_time"):
            r = row[mode]
            print(
                f"{row['concurrency']:>4} {mode:<14} {r['completed']:>2}/{r['requests']:<2} "
                f"{r['tokens_per_second']:>8.1f} {r['ttft_ms_p50']:>9.0f} {r['ttft_ms_p95']:>8.0f} "
                f"{r['tpot_ms_p50']:>9.0f} {r['tpot_ms_p95']:>8.0f}"
            )
        print(
            f"{'':>4} speed-up {row['speedup_tokens_per_second']}x tokens/s "
            f"(per run: {row['speedups']})"
        )
