"""What a draft forward costs in float32 and in bfloat16, and how often their drafts agree
(`SchedulerConfig.draft_precision`, members/draft_body.py).

    HF_HUB_OFFLINE=1 python scripts/draft_precision.py [--rounds 9] [--tokens 24] [--json]

For each default member, after a prefill of a bench prompt: one forward at one new
position through its body and its draft shortlist (decoding/main_drafts.py, the other
member's shared tokens), float32 against the bfloat16 draft body and shortlist, interleaved
over the rounds; medians in ms. Then agreement: on each bench prompt the member's own
greedy continuation of `--tokens` tokens, and at every position whether the bfloat16 draft
body's argmax over the shortlist equals the float32 one (what decides whether a bfloat16
draft is the one float32 would have made). Verification reads float32 logits either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import DynamicCache

from deepen_engine import Ensemble
from deepen_engine.commands.bench.sections import PROMPTS
from deepen_engine.decoding.main_drafts import draft_shortlist
from deepen_engine.members.output_layer import OutputLayer, ShortlistHead


def _draft_ms(body: torch.nn.Module, head: ShortlistHead, prompt: torch.Tensor) -> float:
    """Ms of one forward at one new position after `prompt` through `body` and `head`."""
    cache = DynamicCache()
    with torch.no_grad():
        body(input_ids=prompt, cache=cache, use_cache=True)
        start = time.perf_counter()
        hidden = body(
            input_ids=torch.tensor([[1000]]),
            position_ids=torch.tensor([[prompt.shape[1]]]),
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        head.logits(hidden[:, -1, :])
        return (time.perf_counter() - start) * 1000


def _agreement(ens: Ensemble, i: int, heads: dict[str, ShortlistHead], tokens: int) -> int:
    """Positions of the bench prompts' greedy continuations where both drafts agree."""
    member = ens.members[i]
    layer = member.output_layer
    assert layer is not None
    body = layer.draft_body("bfloat16")
    assert body is not None
    same = 0
    for text in PROMPTS:
        ids = member.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = member.model.generate(ids, max_new_tokens=tokens, do_sample=False)
            read = out[:, :-1]
            exact = layer.body(input_ids=read).last_hidden_state[0, ids.shape[1] - 1 :]
            low = body(input_ids=read).last_hidden_state[0, ids.shape[1] - 1 :]
        want = heads["float32"].logits(exact).argmax(-1)
        got = heads["bfloat16"].logits(low).argmax(-1)
        same += int((want == got).sum())
    return same


def main() -> None:
    """Time and compare each default member's drafts (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per prompt (default 24)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    ens = Ensemble(main=0, weighting="fixed")
    out: dict[str, Any] = {}
    for i, member in enumerate(ens.members):
        layer: OutputLayer | None = member.output_layer
        draft = layer.draft_body("bfloat16") if layer is not None else None
        if layer is None or draft is None:
            continue
        heads = {}
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            head = draft_shortlist(ens.members, i, dtype)
            heads[name] = head if head is not None else layer.shortlist(
                torch.arange(layer.weight.shape[0]), dtype
            )  # fmt: skip
        bodies = {"float32": layer.body, "bfloat16": draft}
        prompt = member.tokenizer(PROMPTS[0] * 4, return_tensors="pt").input_ids
        times: dict[str, list[float]] = {k: [] for k in bodies}
        for _ in range(args.rounds):
            for name, body in bodies.items():
                times[name].append(_draft_ms(body, heads[name], prompt))
        positions = len(PROMPTS) * args.tokens
        out[member.name] = {
            "shortlist_rows": int(heads["float32"].rows.numel()),
            "draft_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
            "agreeing_positions": _agreement(ens, i, heads, args.tokens),
            "positions": positions,
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'member':24}{'rows':>8}{'float32 ms':>12}{'bfloat16 ms':>13}{'agree':>12}")
    for name, r in out.items():
        ms = r["draft_ms"]
        agree = f"{r['agreeing_positions']}/{r['positions']}"
        print(
            f"{name:24}{r['shortlist_rows']:>8}{ms['float32']:>12}{ms['bfloat16']:>13}{agree:>12}"
        )


if __name__ == "__main__":
    main()
