"""`deepen bench`: what an ensemble costs next to its members, and how close its fast path
comes to the full computation.

    deepen bench                                  # the default members
    deepen bench --json --plot bench.png          # every figure as JSON, and a plot
    deepen bench --constraint-only --json         # what a JSON-schema constraint costs
    deepen bench --ray                            # members in Ray actors (ray.py)

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

from ...config import SchedulerConfig
from ...ensemble import Ensemble
from ...errors import ConfigError
from ..options import fusion_options, fusion_settings, member_options, member_specs
from ..plotting import plot_bench
from .constraint import constraint_cost
from .ray import print_ray, run_ray
from .sections import PROMPTS, WINDOW, fidelity, gate_check, length_curve, memory, speed
from .serving import print_serving, serving
from .timing import rss_mb


def add_parser(sub: Any) -> None:
    """Register `deepen bench`."""
    bench = sub.add_parser(
        "bench",
        parents=[member_options(), fusion_options()],
        help="speed, memory and fidelity of the ensemble against its members",
    )
    bench.add_argument(
        "--new-tokens", type=int, default=None,
        help="tokens per row in the batch runs (64; --ray: 32, to finish in about 5 minutes)",
    )  # fmt: skip
    bench.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (1 4 8)"
    )
    bench.add_argument(
        "--long-tokens",
        type=int,
        default=512,
        help="length of the batch-1 runs: ms/token curve and re-encoding baseline (512)",
    )
    bench.add_argument(
        "--fidelity-prompts", type=int, default=4, help="prompts of the fidelity check (4; 0: skip)"
    )
    bench.add_argument(
        "--fidelity-tokens", type=int, default=8, help="tokens per fidelity prompt (8)"
    )
    bench.add_argument(
        "--leftout-mass",
        type=float,
        default=1e-4,
        help="reference fusion: probability of a member's rarest non-anchor tokens it may "
        "leave out (1e-4; 0 = every token, minutes per step for a 262k vocabulary)",
    )
    bench.add_argument(
        "--constraint",
        action="store_true",
        help="also measure ms/token with a JSON-schema constraint against without",
    )
    bench.add_argument(
        "--constraint-only", action="store_true", help="measure only the constraint's cost"
    )
    bench.add_argument(
        "--constraint-mains",
        type=int,
        nargs="+",
        help="constraint section: main members to mask for (default: every member)",
    )
    bench.add_argument(
        "--constraint-repeats", type=int, default=5, help="constraint section: run pairs (5)"
    )
    bench.add_argument(
        "--serving",
        action="store_true",
        help="run the serving benchmark instead: concurrent requests through the scheduler "
        "against one at a time (see --concurrency)",
    )
    bench.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32],
        help="--serving: requests per run (1 8 32)",
    )  # fmt: skip
    bench.add_argument(
        "--serving-tokens", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"),
        help="--serving: new tokens per request, drawn from MIN..MAX (8 24)",
    )  # fmt: skip
    bench.add_argument(
        "--arrival-rate", type=float, default=4.0,
        help="--serving: mean arrivals per second, a Poisson process (4)",
    )  # fmt: skip
    bench.add_argument("--seed", type=int, default=0, help="--serving: workload seed (0)")
    bench.add_argument(
        "--repeat", type=int, default=1,
        help="--serving: interleaved repeats of both runs; figures are medians (1)",
    )  # fmt: skip
    bench.add_argument(
        "--rounds", type=int, default=3,
        help="--ray: interleaved rounds of members alone, in-process and Ray ensembles (3)",
    )  # fmt: skip
    bench.add_argument(
        "--max-batch-size", type=int, default=SchedulerConfig().max_batch_size,
        help="--serving: most rows decoded together (32)",
    )  # fmt: skip
    bench.add_argument(
        "--gate-check",
        action="store_true",
        help="also run every method with each gate (off, agree, confident) on the 8 prompts: "
        "how often it skips fusion, the time saved, the text kept (a few minutes)",
    )
    bench.add_argument(
        "--gate-tokens", type=int, default=32, help="tokens per prompt of --gate-check (32)"
    )
    bench.add_argument("--plot", help="write a PNG of ms/token against new tokens here")
    bench.add_argument("--json", action="store_true", help="print every figure as one JSON object")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed `deepen bench` arguments."""
    if args.new_tokens is None:
        args.new_tokens = 32 if args.ray else 64
    _check_flags(args)
    specs = member_specs(args)
    if len(specs) < 2:  # before loading: a mistake costs no load time
        raise ConfigError("deepen bench compares an ensemble with its members: give 2 or more.")
    if args.ray:
        figures = run_ray(args)
        if args.json:
            print(json.dumps(figures, ensure_ascii=False))
        else:
            print_ray(figures)
        return 0
    rss_start = rss_mb()
    limits = SchedulerConfig(max_batch_size=args.max_batch_size)
    ens = Ensemble(specs, scheduler=limits, **fusion_settings(args))
    if args.serving:
        return _serving(ens, args)
    if args.constraint_only:
        figures = _constraint_section(ens, args)
        print(json.dumps(figures) if args.json else _constraint_table(figures))
        return 0
    figures = _measure(ens, args, rss_start)
    if args.constraint:
        figures.update(_constraint_section(ens, args))
    if args.plot:
        plot_bench(figures, args.plot)
        figures["plot"] = args.plot
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
        return 0
    _print_table(figures)
    return 0


def _header(ens: Ensemble) -> dict[str, Any]:
    """What was measured: members, settings, device."""
    return {
        "members": [m.name for m in ens.members],
        "main": ens.main.name,
        "fusion": {
            k: getattr(ens.fusion, k)
            for k in (
                "method", "weighting", "gate", "eta", "steps", "top_k", "top_mass", "unite_top_k"
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


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse bad flags before any model loads."""
    if args.ray and (args.serving or args.plot):
        raise ConfigError("--ray is a benchmark of its own: leave out --serving and --plot.")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}.")
    if any(n < 1 for n in args.concurrency):
        raise ConfigError(f"--concurrency values must be >= 1, got {args.concurrency}.")
    low, high = args.serving_tokens
    if not 1 <= low <= high:
        raise ConfigError(
            f"--serving-tokens must be MIN MAX with 1 <= MIN <= MAX, got {low} {high}."
        )
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {args.repeat}.")
    if args.arrival_rate <= 0:
        raise ConfigError(f"--arrival-rate must be > 0, got {args.arrival_rate}.")
    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1, got {args.new_tokens}.")
    if args.long_tokens < 2 * WINDOW:
        raise ConfigError(f"--long-tokens must be >= {2 * WINDOW}, got {args.long_tokens}.")
    if any(b < 1 for b in args.batch_sizes):
        raise ConfigError(f"--batch-sizes must all be >= 1, got {args.batch_sizes}.")
    if args.fidelity_prompts < 0 or args.fidelity_prompts > len(PROMPTS):
        raise ConfigError(
            f"--fidelity-prompts must be from 0 to {len(PROMPTS)}, got {args.fidelity_prompts}."
        )
    if not 0 <= args.leftout_mass < 1:
        raise ConfigError(f"--leftout-mass must be in [0, 1), got {args.leftout_mass}.")
    if args.constraint_repeats < 1:
        raise ConfigError(f"--constraint-repeats must be >= 1, got {args.constraint_repeats}.")


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


def _constraint_table(f: dict[str, Any]) -> str:
    c = f["constraint"]
    lines = [f"ms per token, {c['new_tokens']} new tokens, batch 1 (medians)"]
    head = f"{'main':24}{'free':>8}{'any text':>10}{'json':>8}{'+any':>8}{'+json':>8}{'mask':>7}"
    lines.append(head)
    for r in c["rows"]:
        lines.append(
            f"{r['main']:24}{r['free_ms_per_token']:>8.1f}{r['any_text_ms_per_token']:>10.1f}"
            f"{r['json_schema_ms_per_token']:>8.1f}{r['overhead_any_text']:>8.1%}"
            f"{r['overhead_json_schema']:>8.1%}{r['mask_ms_per_token']:>7.2f}"
        )
    return "\n".join(lines)


def _print_table(f: dict[str, Any]) -> None:
    print(f"members {' + '.join(f['members'])} (main {f['main']}), {f['dtype']} on {f['device']}")
    print("\nms per decoding step (one token per row)")
    names = f["members"]
    head = "".join(f"{n[:18]:>20}" for n in names)
    print(f"{'batch':>5}{head}{'sum':>9}{'ensemble':>10}{'ratio':>7}{'fusion share':>14}")
    for r in f["speed"]["rows"]:
        alone = "".join(f"{r['members_alone_ms'][n]:>20.1f}" for n in names)
        print(
            f"{r['batch_size']:>5}{alone}{r['sum_of_members_ms']:>9.1f}{r['ensemble_ms']:>10.1f}"
            f"{r['ratio_ensemble_to_sum']:>7.2f}{r['fusion_only_share']:>14.1%}"
        )
    print("\nms per token after N new tokens (batch 1)")
    print(f"{'N':>6}{'ensemble':>10}{'re-encode':>11}{'sum alone':>11}")
    for p in f["length"]["curve"]:
        print(
            f"{p['new_tokens']:>6}{p['ensemble_ms']:>10.1f}{p['reencode_baseline_ms']:>11.1f}"
            f"{p['sum_of_members_ms']:>11.1f}"
        )
    print(f"speed-up over re-encoding: {f['length']['speedup_over_reencode']}")
    m = f["memory"]
    print(
        f"\npeak RSS {m['peak_rss_mb']:.0f} MiB ({m['peak_rss_above_start_mb']:.0f} above start); "
        f"weights + KV caches + relative space {m['weights_caches_relative_mb']:.0f} MiB"
    )
    fid = f["fidelity"]
    if fid["steps"]:
        print(
            f"fidelity: fast path = reference on {fid['agreeing_steps']}/{fid['steps']} steps "
            f"({fid['agreement']:.1%}); left-out mass <= {fid['leftout_mass_bound']}"
        )
    cold = f["speed"]["cold_run"]
    print(
        f"first request of the process: {cold['cold_over_warm']:.2f}x a warm one "
        f"({cold['rows_computed']} relative rows computed, {cold['rows_from_disk']} from disk)"
    )
    for g in f.get("gate", {}).get("runs", []):
        print(
            f"gate {g['method']:>6} {g['gate']:>9}: skipped {g['gated_share']:.1%} of "
            f"row-steps, fusion time saved {g['fuse_seconds_saved_share']:.1%}, "
            f"{g['rows_same_tokens_as_off']}/{g['rows']} rows as without the gate"
        )
    if "constraint" in f:
        print("\n" + _constraint_table(f))
    if "plot" in f:
        print(f"plot: {f['plot']}")
