"""Fusion alone, on recorded steps: CPU time of `Fuser.fuse` at batch 1 and 8, and whether
two checkouts fuse to the same tokens.

1. `record`: decode the bench's 8 prompts greedily with the default pair (batch 8) and keep
   every step's member logits (one file, about 10 MB per step).
2. `time`: fuse the recorded steps as batches of 8 and row by row, after one warm-up pass
   (relative rows cached); CPU seconds of this process per fusion, one torch thread, so a
   machine shared with other work measures the work done, not the wait.
3. `save` / `compare`: the fused logits of every recorded step (batch 8 and each row
   alone), then the greedy tokens and largest logit difference against a saved file.
4. `reductions`: `torch.topk` (k 64) and `torch.argmax` against deepen_engine/reductions.py's
   blocked ones (block sizes 32-256) on each member's recorded logits at batch 1 and 8,
   interleaved, median wall ms of one thread; checks they return the same ids.

Run each checkout's copy by putting it first on the path (A/B of two commits):

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py record steps.pt --tokens 16
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py time steps.pt --repeat 3
    HF_HUB_OFFLINE=1 PYTHONPATH=../old python scripts/fusion_cost.py save steps.pt old.pt
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py compare steps.pt old.pt
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py reductions steps.pt
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from deepen_engine import Ensemble, reductions
from deepen_engine.commands.bench.sections import PROMPTS

BENCH_FUSION = {"main": 0, "weighting": "fixed"}
"""The bench's fusion settings (`deepen bench`: Gemma-3 leads, fixed uniform weights); the
engine's defaults (leader and weights per prompt) need each row's prompt scores, which
recorded logits do not carry."""


def _record(path: str, tokens: int) -> None:
    ens = Ensemble(**BENCH_FUSION)
    steps: list[list[torch.Tensor]] = []
    fuse = ens.fuser.fuse

    def recording(
        logits: Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        steps.append([x.detach().clone() for x in logits])
        return fuse(logits, weights)

    ens.fuser.fuse = recording  # type: ignore[method-assign]
    ens.generate(list(PROMPTS), max_new_tokens=tokens, min_new_tokens=tokens)
    torch.save(steps, path)
    print(f"{len(steps)} steps of batch {steps[0][0].shape[0]} -> {path}")


def _fusions(ens: Ensemble, steps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Fused logits of every step as a batch, then of each of its rows alone."""
    out = []
    for step in steps:
        out.append(ens.fuser.fuse(step))
        out.extend(ens.fuser.fuse([x[b : b + 1] for x in step]) for b in range(len(step[0])))
    return out


def _time_each(
    timings: dict[str, list[float]], name: str, fn: Callable[[torch.Tensor], object], xs: list
) -> None:
    """Add one pass of `fn` over xs to `timings[name]`: wall ms per call."""
    start = time.perf_counter()
    for x in xs:
        fn(x)
    timings.setdefault(name, []).append((time.perf_counter() - start) * 1e3 / len(xs))


def _reductions(steps: list[list[torch.Tensor]], repeat: int) -> None:
    """Time torch's top-k and argmax against the blocked ones (see the module docstring)."""
    default = reductions.BLOCK
    for batch in (1, 8):
        for member in range(len(steps[0])):
            xs = [step[member][:batch].float().contiguous() for step in steps]
            timings: dict[str, list[float]] = {}
            for _ in range(repeat):
                _time_each(timings, "torch topk", lambda x: x.topk(64, dim=-1), xs)
                for size in (32, 64, 128, 256):
                    reductions.BLOCK = size
                    _time_each(timings, f"top_k {size}", lambda x: reductions.top_k(x, 64), xs)
                reductions.BLOCK = default
                _time_each(timings, "torch argmax", lambda x: x.argmax(-1), xs)
                _time_each(timings, f"argmax {default}", reductions.argmax, xs)
            same = all(
                torch.equal(reductions.top_k(x, 64)[1], x.topk(64, dim=-1).indices)
                and torch.equal(reductions.argmax(x), x.argmax(-1))
                for x in xs
            )
            figures = "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in timings.items())
            vocab = xs[0].shape[-1]
            print(f"batch {batch} member {member} (V={vocab}): {figures} ms; same ids: {same}")


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["record", "time", "save", "compare", "reductions"])
    parser.add_argument("steps", help="file of recorded steps")
    parser.add_argument("fused", nargs="?", help="save/compare: file of fused logits")
    parser.add_argument("--tokens", type=int, default=16, help="record: steps to record")
    parser.add_argument("--repeat", type=int, default=3, help="time: passes timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.action == "record":
        _record(args.steps, args.tokens)
        return
    steps = torch.load(args.steps)
    if args.action == "reductions":
        _reductions(steps, args.repeat)
        return
    ens = Ensemble(**BENCH_FUSION)
    if args.action == "time":
        batch = len(steps[0][0])
        rows = [[x[b : b + 1] for x in step] for step in steps for b in range(batch)]
        for s in steps + rows:  # warm-up: every relative row cached
            ens.fuser.fuse(s)
        for name, runs in ((f"batch {batch}", steps), ("batch 1", rows)):
            per = []
            for _ in range(args.repeat):
                start = time.process_time()
                for s in runs:
                    ens.fuser.fuse(s)
                per.append((time.process_time() - start) * 1000 / len(runs))
            print(f"{name}: {statistics.median(per):.2f} CPU ms per fusion (runs {per})")
    elif args.action == "save":
        torch.save(_fusions(ens, steps), args.fused)
    else:
        saved = torch.load(args.fused)
        now = _fusions(ens, steps)
        same = sum(int((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(now, saved))
        worst = max(float((a - b).abs().max()) for a, b in zip(now, saved))
        print(
            f"same greedy tokens in {same}/{len(now)} fusions; largest logit difference {worst:.3g}"
        )


if __name__ == "__main__":
    main()
