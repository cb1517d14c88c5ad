"""Where speculative drafts are lost on an eval task's test prompts: cut before
verification (the drafted text does not end on a boundary the helper's own sync makes
there, decoding/speculative.py step 3) or rejected by the fused choice (acceptance.py).

Greedy, batch 1, the first `--prompts` test prompts of each task one after another, 16 new
tokens, speculate 4, the main-member drafter, the leader given by `--main` (the bench's 0,
Gemma-3, by default; `auto` for the engine's own). Prints per task: tokens drafted, those
the helper could verify (a token past a cut in its draft is not), and those kept
(`usage.accepted_tokens`). A token past a cut may also follow a rejected one: the cut
counts are what verification could not read, an upper bound of what boundaries cost.
Then, decoding the same prompts without speculation, the share of steps whose fused
argmax differs from the leader's own argmax.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/draft_losses.py --main 0
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from typing import Any

import torch

from deepen_engine import Ensemble
from deepen_engine.commands.bench.speculative import task_prompts
from deepen_engine.decoding import speculative
from deepen_engine.fusion.base import Fuser


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main", default="0", help="leader: a member index or auto")
    parser.add_argument("--prompts", type=int, default=8, help="test prompts per task")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    fuse: Callable[..., Any] = speculative.Speculator._fuse

    def counting(self: speculative.Speculator, drafts: list, helper_logits: list) -> Any:
        for d in drafts:  # d.positions: fused positions; position t verifies drafted token t
            counts["drafted"] += len(d.tokens)
            counts["verifiable"] += min(len(d.tokens), d.positions)
        return fuse(self, drafts, helper_logits)

    speculative.Speculator._fuse = counting  # type: ignore[method-assign]
    fuse_step: Callable[..., torch.Tensor] = Fuser.fuse
    differs: list[bool] = []

    def comparing(self: Fuser, logits: list, weights: torch.Tensor | None = None) -> torch.Tensor:
        fused = fuse_step(self, logits, weights)
        leader = logits[self.main].float().to(fused.device)
        differs.extend((fused.argmax(-1) != leader.argmax(-1)).tolist())
        return fused

    Fuser.fuse = comparing  # type: ignore[method-assign]
    ens = Ensemble()
    view = ens.with_fusion(main=args.main if args.main == "auto" else int(args.main))
    for task in ("capitals", "countries", "arithmetic", "demonyms"):
        counts.clear()
        kept = 0
        for prompt in task_prompts(task, args.prompts):
            result = view.generate(prompt, max_new_tokens=16, speculate=4)
            kept += result.usage.accepted_tokens
        differs.clear()
        for prompt in task_prompts(task, args.prompts):
            view.generate(prompt, max_new_tokens=16, speculate=0)
        share = sum(differs) / max(1, len(differs))
        drafted, verifiable = counts["drafted"], counts["verifiable"]
        print(
            f"{task}: drafted {drafted}; past a cut at a helper boundary "
            f"{drafted - verifiable}; verifiable {verifiable}, of them not kept (the fused "
            f"choice differed there or before) {verifiable - kept}; kept {kept}; "
            f"standard steps whose fused argmax is not the leader's: {share:.1%}"
        )


if __name__ == "__main__":
    main()
