"""`deepen bench`: what an ensemble costs next to its members, and how close its fast path
comes to the full computation.

    deepen bench                                  # the default members
    deepen bench --json --plot bench.png          # every figure as JSON, and a plot
    deepen bench --constraint-only --json         # what a JSON-schema constraint costs
    deepen bench --ray                            # members in Ray actors (ray.py)
    deepen bench --load --dtype bfloat16          # load time and peak memory (load.py)
    deepen bench --soak --json                    # load and faults against deepen serve

Sections (each a key of the JSON output; docs/benchmarks.md describes every field):

- `speed`: milliseconds per decoding step (one new token for each row) at each batch size,
  for each member alone (transformers `generate` with its KV cache, same prompts, same
  number of new tokens) and for the ensemble (`Ensemble.generate`); the ratio ensemble /
  sum of members, and the share of the ensemble's time spent outside member forwards
  (fusion, sampling, helper sync, text).
- `length`: ms per token at L new tokens (mean of the 8 steps ending there) at batch 1,
  for the ensemble, the sum of the members alone and a re-encoding baseline (the same
  fusion, but every helper re-encodes its whole text each step, as the reference
  implementation does); the speed-up over the baseline at 128 tokens and at the longest
  length.
- `memory`: peak resident memory of this process against the members' weights, their KV
  caches at the largest run, and the relative-space tensors.
- `fidelity`: on fixed prompts, the share of steps where the fast path (top-k) picks the
  same token as the full-vocabulary reference fusion (fusion/reference.py).
- `constraint` (only when asked: `--constraint`, or `--constraint-only` for it alone): ms
  per token with a JSON-schema constraint against the same run without one, per main
  member (constraint.py).
- `speculative` (only when asked: `--speculative`, or `--speculative-only`): speculative
  decoding (`speculate=K`) against standard decoding at batch 1 and 8, greedy and sampled
  (speculative.py).

Every run uses `min_new_tokens`, so all rows generate exactly the asked number of tokens.
Timings on a shared CPU vary by 10-30% from run to run: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ...ensemble import Ensemble
from ...errors import ConfigError
from ..options import fusion_options, fusion_settings, member_options, member_specs
from ..plotting import plot_bench
from ..scheduler_options import scheduler_limits
from .arguments import BENCH_LIMITS, add_arguments, check_flags
from .constraint import constraint_cost
from .load import load_costs, load_table
from .ray import print_ray, run_ray
from .sections import PROMPTS, fidelity, gate_check, length_curve, memory, speed
from .serving import print_serving, serving
from .soak import run_soak
from .soak_report import print_soak
from .speculative import speculative_cost, speculative_table, task_prompts
from .tables import constraint_table, print_table
from .timing import rss_mb


def add_parser(sub: Any) -> None:
    """Register `deepen bench`."""
    bench = sub.add_parser(
        "bench",
        parents=[member_options(), fusion_options(main_default=0)],
        help="speed, memory and fidelity of the ensemble against its members",
    )
    add_arguments(bench)
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed `deepen bench` arguments."""
    if args.new_tokens is None:
        args.new_tokens = 32 if args.ray else 64
    check_flags(args)
    specs = member_specs(args)
    if args.load:
        rows = load_costs(specs, args.repeat)
        print(json.dumps({"load": rows}) if args.json else load_table(rows))
        return 0
    if len(specs) < 2:  # before loading: a mistake costs no load time
        raise ConfigError("deepen bench compares an ensemble with its members: give 2 or more.")
    if args.soak:  # its own server process loads the members
        figures = run_soak(args)
        if args.json:
            print(json.dumps(figures, ensure_ascii=False))
        else:
            print_soak(figures)
        return 0 if figures["soak"]["passed"] else 1
    if args.ray:
        figures = run_ray(args)
        if args.json:
            print(json.dumps(figures, ensure_ascii=False))
        else:
            print_ray(figures)
        return 0
    rss_start = rss_mb()
    limits = scheduler_limits(args, BENCH_LIMITS)
    ens = Ensemble(specs, scheduler=limits, **fusion_settings(args))
    if args.serving:
        return _serving(ens, args)
    if args.constraint_only:
        figures = _constraint_section(ens, args)
        print(json.dumps(figures) if args.json else constraint_table(figures))
        return 0
    if args.speculative_only:
        figures = {"members": [m.name for m in ens.members], **_speculative_section(ens, args)}
        print(json.dumps(figures) if args.json else speculative_table(figures))
        return 0
    figures = _measure(ens, args, rss_start)
    if args.constraint:
        figures.update(_constraint_section(ens, args))
    if args.speculative:
        figures.update(_speculative_section(ens, args))
    if args.plot:
        plot_bench(figures, args.plot)
        figures["plot"] = args.plot
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
        return 0
    print_table(figures)
    return 0


def _header(ens: Ensemble) -> dict[str, Any]:
    """What was measured: members, settings, device."""
    return {
        "members": [m.name for m in ens.members],
        "main": ens.main.name,
        "fusion": {
            k: getattr(ens.fusion, k)
            for k in (
                "method",
                "weighting",
                "gate",
                "eta",
                "steps",
                "top_k",
                "top_mass",
                "unite_top_k",
            )
        },
        "device": str(ens.main.device),
        "dtype": str(ens.main.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": {m.name: round(m.load_seconds, 2) for m in ens.members},
        "align_seconds": round(ens.align_seconds, 2),
    }


def _serving(ens: Ensemble, args: argparse.Namespace) -> int:
    figures = _header(ens)
    with tqdm(total=len(args.concurrency), desc="deepen bench --serving", file=sys.stderr) as bar:
        figures["serving"] = serving(
            ens,
            args.concurrency,
            (args.serving_tokens[0], args.serving_tokens[1]),
            args.arrival_rate,
            args.seed,
            lambda: bar.update(1),
            repeat=args.repeat,
        )
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
    else:
        print_serving(figures)
    return 0


def _measure(ens: Ensemble, args: argparse.Namespace, rss_start: float) -> dict[str, Any]:
    """Every section's figures, with a progress bar on stderr."""
    n_ticks = len(args.batch_sizes) * (len(ens.members) + 1) + 3 + args.fidelity_prompts
    n_ticks += 9 if args.gate_check else 0
    figures = _header(ens)
    seconds: dict[str, float] = {}
    figures["section_seconds"] = seconds
    with tqdm(total=n_ticks, desc="deepen bench", file=sys.stderr) as bar:

        def tick() -> None:
            bar.update(1)

        start = time.perf_counter()
        figures["speed"] = speed(ens, args.new_tokens, args.batch_sizes, tick)
        seconds["speed"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        figures["length"] = length_curve(ens, args.long_tokens, tick)
        seconds["length"] = round(time.perf_counter() - start, 1)
        prompt_tokens = max(len(m.tokenizer(p).input_ids) for m in ens.members for p in PROMPTS)
        largest = max(
            (max(args.batch_sizes), prompt_tokens + args.new_tokens),
            (1, prompt_tokens + args.long_tokens),
            key=lambda bp: bp[0] * bp[1],
        )
        # before the fidelity check, whose reference rows are not part of the ensemble
        figures["memory"] = memory(ens, rss_start, largest)
        start = time.perf_counter()
        figures["fidelity"] = fidelity(
            ens, PROMPTS[: args.fidelity_prompts], args.fidelity_tokens, args.leftout_mass, tick
        )
        seconds["fidelity"] = round(time.perf_counter() - start, 1)
        if args.gate_check:
            start = time.perf_counter()
            figures["gate"] = gate_check(ens, PROMPTS, args.gate_tokens, tick)
            seconds["gate"] = round(time.perf_counter() - start, 1)
    return figures


def _speculative_section(ens: Ensemble, args: argparse.Namespace) -> dict[str, Any]:
    """The speculative section, with a progress bar on stderr."""
    sizes = args.speculative_batch_sizes
    with tqdm(total=2 * len(sizes), desc="deepen bench speculative", file=sys.stderr) as bar:

        def tick() -> None:
            bar.update(1)

        k, repeats = args.speculate_k, args.speculative_repeats
        drafters = args.speculative_drafters
        prompts = PROMPTS if args.speculative_task is None else task_prompts(args.speculative_task)
        groups = args.speculative_groups
        section = speculative_cost(
            ens, sizes, args.new_tokens, k, repeats, tick, drafters, prompts, groups
        )
        section["prompts"] = args.speculative_task or "bench"
    return {"speculative": section}


def _constraint_section(ens: Ensemble, args: argparse.Namespace) -> dict[str, Any]:
    """The constraint section, with a progress bar on stderr."""
    mains = args.constraint_mains or list(range(len(ens.members)))
    if any(not 0 <= m < len(ens.members) for m in mains):
        raise ConfigError(f"--constraint-mains {mains} out of range for {len(ens.members)}.")
    total = len(mains) * args.constraint_repeats
    with tqdm(total=total, desc="deepen bench constraint", file=sys.stderr) as bar:

        def tick() -> None:
            bar.update(1)

        section = constraint_cost(ens, mains, args.new_tokens, args.constraint_repeats, tick)
    return {"members": [m.name for m in ens.members], "constraint": section}
