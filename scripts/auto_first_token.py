"""Time to the first token with `main="auto"` against a fixed leader, on an eval task's
few-shot test prompts (batch 1, one prompt after another), rounds interleaved.

`main="auto"` reads every prompt with every member to choose the row's leader
(decoding/leaders.py). Since 2026-12-07 the row's batch adopts those caches; before, it read
the prompt again, so the first token took one more prefill than with the leader fixed.
Prints the median seconds per prompt of `generate(prompt, max_new_tokens=1)` for each
setting and the median ratio auto / fixed. Run each checkout's copy by putting it first
on the path:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/auto_first_token.py --task capitals

`--ray` places each member in a Ray actor of a local Ray cluster: since later the same
evening the row's batch adopts the actors' scoring prefill for requests of one row (as
here), and the actors score at the same time (auto / fixed 2.00-2.05 -> 1.00 on capitals).
`--batch` sends each round's prompts as one request of several rows instead: their
caches are copied out of the scoring prefill (in process, and in the actors since
2026-12-07, night).
"""

from __future__ import annotations

import argparse
import statistics
import time

from deepen_engine import Ensemble, MemberSpec
from deepen_engine.commands.bench.speculative import task_prompts


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="capitals", help="eval task of the prompts")
    parser.add_argument("--prompts", type=int, default=4, help="test prompts per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--ray", action="store_true", help="members in Ray actors")
    parser.add_argument(
        "--batch", action="store_true", help="each round's prompts as one request of many rows"
    )
    args = parser.parse_args()
    if args.ray:
        from deepen_engine.members import DEFAULT_MEMBERS

        ens = Ensemble([MemberSpec(source=s, placement="ray") for s in DEFAULT_MEMBERS])
    else:
        ens = Ensemble()
    try:
        _time(ens, args.task, args.prompts, args.rounds, args.batch)
    finally:
        ens.close()


def _time(ens: Ensemble, task: str, count: int, rounds: int, batch: bool) -> None:
    """Print the medians (see the module docstring)."""
    prompts = task_prompts(task, count)
    views = {"auto": ens.with_fusion(main="auto"), "main 0": ens.with_fusion(main=0)}
    for view in views.values():  # warm-up: relative rows, first-call costs
        view.generate(prompts[0], max_new_tokens=1)
    seconds: dict[str, list[float]] = {name: [] for name in views}
    for _ in range(rounds):
        for name, view in views.items():
            start = time.perf_counter()
            for request in [prompts] if batch else prompts:
                view.generate(request, max_new_tokens=1)
            seconds[name].append((time.perf_counter() - start) / len(prompts))
    ratios = [a / f for a, f in zip(seconds["auto"], seconds["main 0"])]
    for name, runs in seconds.items():
        print(f"{name}: {statistics.median(runs):.3f} s per prompt (rounds {runs})")
    print(f"auto / main 0: {statistics.median(ratios):.2f} (median of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
