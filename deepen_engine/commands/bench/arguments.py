"""The flags of `deepen bench`, one helper per group (in the order `--help` lists them),
and their checks before any model loads.
"""

from __future__ import annotations

import argparse

from ...errors import ConfigError
from ..eval.tasks import TASKS
from ..scheduler_options import add_scheduler_limits
from .sections import PROMPTS, WINDOW
from .soak_faults import SOAK_KINDS

BENCH_LIMITS = ("max_batch_size", "speculate_max_rows", "draft_precision")
"""The `SchedulerConfig` limits `deepen bench` takes as flags."""


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """Every flag of `deepen bench` (the member and fusion options come from its parents)."""
    for group in (
        _speed_arguments,
        _length_arguments,
        _fidelity_arguments,
        _constraint_arguments,
        _speculative_arguments,
        _serving_arguments,
        _soak_arguments,
        _ray_arguments,
        _scheduler_arguments,
        _gate_arguments,
        _load_arguments,
        _output_arguments,
    ):
        group(bench)


def _speed_arguments(bench: argparse.ArgumentParser) -> None:
    """The batch runs of the `speed` section."""
    bench.add_argument(
        "--new-tokens", type=int, default=None,
        help="tokens per row in the batch runs (64; --ray: 32, to finish in about 5 minutes)",
    )  # fmt: skip
    bench.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (1 4 8)"
    )


def _length_arguments(bench: argparse.ArgumentParser) -> None:
    """The batch-1 runs of the `length` section."""
    bench.add_argument(
        "--long-tokens",
        type=int,
        default=512,
        help="length of the batch-1 runs: ms/token curve and re-encoding baseline (512)",
    )


def _fidelity_arguments(bench: argparse.ArgumentParser) -> None:
    """The `fidelity` section: fast path against the reference fusion."""
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


def _constraint_arguments(bench: argparse.ArgumentParser) -> None:
    """The `constraint` section: ms/token with a JSON-schema constraint."""
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


def _speculative_arguments(bench: argparse.ArgumentParser) -> None:
    """The `speculative` section: speculative against standard decoding."""
    bench.add_argument(
        "--speculative",
        action="store_true",
        help="also measure speculative decoding (speculate=K) against standard decoding",
    )
    bench.add_argument(
        "--speculative-only", action="store_true", help="measure only speculative decoding"
    )
    bench.add_argument(
        "--speculate-k", type=int, default=4, help="speculative section: draft length K (4)"
    )
    bench.add_argument(
        "--speculative-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8],
        help="speculative section: batch sizes (1 8)",
    )
    bench.add_argument(
        "--speculative-drafters",
        nargs="+",
        default=["main"],
        metavar="DRAFTER",
        help="speculative section: drafters compared in each round, each main, auto, lookup "
        "or a member index (GenerationConfig.drafter; main)",
    )
    bench.add_argument(
        "--speculative-repeats",
        type=int,
        default=3,
        help="speculative section: interleaved rounds (3)",
    )
    bench.add_argument(
        "--speculative-groups",
        type=int,
        default=1,
        metavar="G",
        help="speculative section: each run decodes G batches one after another, so batch "
        "size 1 covers G prompts (1)",
    )
    bench.add_argument(
        "--speculative-task",
        choices=sorted(TASKS),
        help="speculative section: prompts from this eval task's test questions (its "
        "few-shot prompts as `deepen eval` builds them, seed 0) instead of the bench's",
    )


def _serving_arguments(bench: argparse.ArgumentParser) -> None:
    """`--serving` and its workload: concurrent requests through the scheduler."""
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
        help="--serving: interleaved repeats of both runs; figures are medians; --load: "
        "interleaved loads of each member, the median kept (1)",
    )  # fmt: skip


def _soak_arguments(bench: argparse.ArgumentParser) -> None:
    """`--soak`: a load-and-fault run against a `deepen serve` on loopback (soak.py)."""
    bench.add_argument(
        "--soak",
        action="store_true",
        help="run the soak instead: start deepen serve on 127.0.0.1, load it with clients "
        "that also disconnect, send malformed bodies and time out, then check it",
    )
    bench.add_argument(
        "--soak-clients", type=int, default=16, help="--soak: concurrent clients (16)"
    )
    bench.add_argument(
        "--soak-seconds", type=float, default=60.0, help="--soak: seconds of load (60)"
    )
    bench.add_argument(
        "--soak-tokens", type=int, default=12, help="--soak: max_tokens per request (12)"
    )
    bench.add_argument(
        "--soak-kinds", nargs="+", default=list(SOAK_KINDS), choices=SOAK_KINDS,
        help=f"--soak: well-formed request kinds ({' '.join(SOAK_KINDS)})",
    )  # fmt: skip
    for share, default, what in (
        ("malformed", 0.15, "requests with a malformed body"),
        ("disconnect", 0.25, "streams dropped after the first chunk"),
        ("timeouts", 0.05, "requests whose timeout is too short"),
    ):
        bench.add_argument(
            f"--soak-{share}", type=float, default=default,
            help=f"--soak: share of {what} ({default})",
        )  # fmt: skip
    bench.add_argument(
        "--soak-rss-limit", type=float, default=5.0,
        help="--soak: most server RSS growth after the warm-up, in percent (5)",
    )  # fmt: skip


def _ray_arguments(bench: argparse.ArgumentParser) -> None:
    """`--ray` (a member option): its interleaved rounds."""
    bench.add_argument(
        "--rounds", type=int, default=3,
        help="--ray: interleaved rounds of members alone, in-process and Ray ensembles (3)",
    )  # fmt: skip


def _scheduler_arguments(bench: argparse.ArgumentParser) -> None:
    """The scheduler's limits, for the ensemble every in-process run builds."""
    add_scheduler_limits(bench, BENCH_LIMITS, where={"max_batch_size": "--serving: "})


def _gate_arguments(bench: argparse.ArgumentParser) -> None:
    """`--gate-check`: every method with each gate."""
    bench.add_argument(
        "--gate-check",
        action="store_true",
        help="also run every method with each gate (off, agree, confident) on the 8 prompts: "
        "how often it skips fusion, the time saved, the text kept (a few minutes)",
    )
    bench.add_argument(
        "--gate-tokens", type=int, default=32, help="tokens per prompt of --gate-check (32)"
    )


def _load_arguments(bench: argparse.ArgumentParser) -> None:
    """`--load`: each member's load time and peak memory (load.py)."""
    bench.add_argument(
        "--load", action="store_true",
        help="only measure loading: per member, seconds and peak RSS against its weights' "
        "size in --dtype, each load in a fresh process (one member is enough)",
    )  # fmt: skip


def _output_arguments(bench: argparse.ArgumentParser) -> None:
    """What the command writes: a plot, JSON instead of tables."""
    bench.add_argument("--plot", help="write a PNG of ms/token against new tokens here")
    bench.add_argument("--json", action="store_true", help="print every figure as one JSON object")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse bad flags before any model loads."""
    if args.load and (args.ray or args.serving or args.plot or args.constraint_only):
        raise ConfigError(
            "--load is a benchmark of its own: leave out --ray, --serving, --constraint-only "
            "and --plot."
        )
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
    if args.soak and (args.serving or args.ray or args.plot):
        raise ConfigError("--soak is a run of its own: leave out --serving, --ray and --plot.")
    if args.soak_clients < 1 or args.soak_seconds <= 0 or args.soak_tokens < 1:
        raise ConfigError(
            "--soak-clients and --soak-tokens must be >= 1 and --soak-seconds > 0, got "
            f"{args.soak_clients}, {args.soak_tokens} and {args.soak_seconds}."
        )
    shares = (args.soak_malformed, args.soak_disconnect, args.soak_timeouts)
    if any(s < 0 for s in shares) or sum(shares) > 1:
        raise ConfigError(
            "--soak-malformed, --soak-disconnect and --soak-timeouts must be >= 0 and sum to "
            f"at most 1, got {' + '.join(map(str, shares))}."
        )
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
    if not 1 <= args.speculate_k <= 16:
        raise ConfigError(f"--speculate-k must be from 1 to 16, got {args.speculate_k}.")
    for i, drafter in enumerate(args.speculative_drafters):
        if drafter not in ("main", "auto", "lookup"):
            if not drafter.isdigit():
                raise ConfigError(
                    f"--speculative-drafters: each must be main, auto, lookup or a member index, "
                    f"got {drafter!r}."
                )
            args.speculative_drafters[i] = int(drafter)
    if args.speculative_groups < 1:
        raise ConfigError(f"--speculative-groups must be >= 1, got {args.speculative_groups}.")
    if args.speculative_repeats < 1:
        raise ConfigError(f"--speculative-repeats must be >= 1, got {args.speculative_repeats}.")
    if any(b < 1 for b in args.speculative_batch_sizes):
        raise ConfigError(
            f"--speculative-batch-sizes must all be >= 1, got {args.speculative_batch_sizes}."
        )
