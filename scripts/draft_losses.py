"""Where speculative drafts go on an eval task's test prompts: kept, or rejected by the
fused choice (acceptance.py), and how often a draft kept up to a position whose text does
not end on a boundary of the helper's tokens had the helper re-synced there to read on
(decoding/speculative.py step 5; before that re-sync, verification stopped there).

Greedy, batch 1, the first `--prompts` test prompts of each task one after another, 16 new
tokens, speculate 4, the main-member drafter, the leader given by `--main` (the bench's 0,
Gemma-3, by default; `auto` for the engine's own). Prints per task: tokens drafted, kept
(`usage.accepted_tokens`) and the re-syncs (`usage.resyncs`). Then, decoding the same
prompts without speculation, the share of steps whose fused argmax differs from the
leader's own argmax.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/draft_losses.py --main 0
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch

from deepen_engine import Ensemble
from deepen_engine.commands.bench.speculative import task_prompts
from deepen_engine.fusion.base import Fuser


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main", default="0", help="leader: a member index or auto")
    parser.add_argument("--prompts", type=int, default=8, help="test prompts per task")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
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
        for prompt in task_prompts(task, args.prompts):
            usage = view.generate(prompt, max_new_tokens=16, speculate=4).usage
            counts.update(
                drafted=usage.drafted_tokens, kept=usage.accepted_tokens, resyncs=usage.resyncs
            )
        differs.clear()
        for prompt in task_prompts(task, args.prompts):
            view.generate(prompt, max_new_tokens=16, speculate=0)
        share = sum(differs) / max(1, len(differs))
        print(
            f"{task}: drafted {counts['drafted']}; kept {counts['kept']}; helper re-synced "
            f"inside a draft {counts['resyncs']} times; standard steps whose fused argmax "
            f"is not the leader's: {share:.1%}"
        )


if __name__ == "__main__":
    main()
