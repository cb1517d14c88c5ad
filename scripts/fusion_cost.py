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
5. `passes`: on each member's recorded batch-8 logits, the fast path's passes over a
   vocabulary, old way against new, interleaved, median wall ms of one thread:
   `logsumexp` against `reductions.log_normaliser`, `exp` against `reductions.exp_` (on
   the anchor tokens' logits), the anchor tokens' logits read in one `index_select`
   against two (`MemberTables.anchor_read` / `anchor_order`; also right after an `amax`
   of the rows, as in the fuser, where a row that fits the cache is still there), and the
   main member's top 64 merged from the parts the fast path reads anyway (the top of its
   anchor, non-anchor and special tokens) against one blocked `top_k`; checks each pair
   agrees.

Run each checkout's copy by putting it first on the path (A/B of two commits):

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py record steps.pt --tokens 16
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py time steps.pt --repeat 3
    HF_HUB_OFFLINE=1 PYTHONPATH=../old python scripts/fusion_cost.py save steps.pt old.pt
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py compare steps.pt old.pt
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py reductions steps.pt
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/fusion_cost.py passes steps.pt
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


def _top_of_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor]], c: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `c` logits and token ids (B, c), best first, of a vocabulary split in parts:
    each part is its (B, n) logits and either (n,) token ids or (B, n) ids per row. The
    same tokens as one top-k over the whole vocabulary (in another order only where
    logits tie), from a top-k over each part and one over their (B, <= 3c) winners. The
    fuser's candidates came from these until 2026-12-08; kept here to time the old way.
    """
    values, ids = [], []
    for x, part_ids in parts:
        if x.shape[-1] == 0:
            continue
        top, where = reductions.top_k(x, min(c, x.shape[-1]))
        values.append(top)
        ids.append(part_ids[where] if part_ids.dim() == 1 else part_ids.gather(1, where))
    best, pick = torch.cat(values, dim=1).topk(c, dim=-1)
    return best, torch.cat(ids, dim=1).gather(1, pick)


def _passes(ens: Ensemble, steps: list[list[torch.Tensor]], repeat: int) -> None:
    """Old and new ways of the fast path's passes over a vocabulary (module docstring)."""
    for member in range(len(steps[0])):
        xs = [step[member].float().contiguous() for step in steps]
        print(_member_passes(ens, member, xs, repeat))


def _member_passes(ens: Ensemble, member: int, xs: list[torch.Tensor], repeat: int) -> str:
    """One member's line of `passes`."""
    from deepen_engine.fusion.tables import MemberTables

    fuser = ens.fuser
    tables = fuser.tables[member]
    large = MemberTables.build(fuser.spaces[member].token_to_anchor, fuser.has_text[member])
    read, order = large.anchor_read, large.anchor_order
    if order is None:  # a small vocabulary: build the two reads to time them anyway
        read, by_id = tables.anchor_tokens.sort()
        order = by_id.argsort()
    lses = [x.logsumexp(-1, keepdim=True) for x in xs]
    anchors = [x.index_select(1, tables.anchor_tokens) - lse for x, lse in zip(xs, lses)]

    # the old candidates merged the parts the fast path reads anyway: the anchor tokens',
    # the top non-anchor tokens' and the special tokens' logits (read here, not timed)
    read_parts = {
        id(x): [
            (x.index_select(1, tables.anchor_tokens), tables.anchor_tokens),
            reductions.top_k(x + tables.non_anchor_bias, 64),
            (x.index_select(1, tables.no_text), tables.no_text),
        ]
        for x in xs
    }

    ways: list[tuple[str, Callable[[torch.Tensor], object], list[torch.Tensor]]] = [
        ("logsumexp", lambda x: x.logsumexp(-1, keepdim=True), xs),
        ("log_normaliser", reductions.log_normaliser, xs),
        ("exp", lambda a: a.exp(), anchors),
        ("exp_", lambda a: reductions.exp_(a.clone()), anchors),
        ("one read", lambda x: x.index_select(1, tables.anchor_tokens), xs),
        ("two reads", lambda x: x.index_select(1, read).index_select(1, order), xs),
        # as in the fuser, right after a pass over the row (its log normaliser's)
        ("amax", lambda x: x.amax(-1), xs),
        ("amax + one read", lambda x: (x.amax(-1), x.index_select(1, tables.anchor_tokens)), xs),
        (
            "amax + two reads",
            lambda x: (x.amax(-1), x.index_select(1, read).index_select(1, order)),
            xs,
        ),
    ]
    if member == fuser.main:
        ways += [
            ("top 64 from parts", lambda x: _top_of_parts(read_parts[id(x)], 64), xs),
            ("top 64 blocked", lambda x: reductions.top_k(x, 64), xs),
        ]
    timings: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, fn, args in ways:
            _time_each(timings, name, fn, args)
    figures = "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in timings.items())
    agree = all(
        torch.allclose(reductions.log_normaliser(x), lse, rtol=1e-6, atol=0)
        and torch.equal(
            x.index_select(1, read).index_select(1, order),
            x.index_select(1, tables.anchor_tokens),
        )
        for x, lse in zip(xs, lses)
    )
    shape = f"V={xs[0].shape[-1]}, batch {len(xs[0])}"
    return f"member {member} ({shape}): {figures} ms; agree: {agree}"


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "action", choices=["record", "time", "save", "compare", "reductions", "passes"]
    )
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
    if args.action == "passes":
        _passes(ens, steps, args.repeat)
    elif args.action == "time":
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
