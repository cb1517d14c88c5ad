"""How often bfloat16 members give other greedy text than float32 ones (issue 25).

    HF_HUB_OFFLINE=1 python scripts/compare_dtypes.py [--new-tokens 32] [--json]

Loads the default pair twice, in float32 and in bfloat16 (on the CPU, or --device), and
generates greedily on the bench prompts (commands/bench/sections.py): each member alone
(main member i with eta=0) and the fused ensemble. For each, it reports the prompts whose
text is the same in both dtypes and, for the others, the first token where they part.
"""

from __future__ import annotations

import argparse
import json

from deepen_engine import DEFAULT_MEMBERS, Ensemble, MemberSpec
from deepen_engine.commands.bench.sections import PROMPTS


def _runs(ens: Ensemble, new_tokens: int) -> dict[str, list[list[int]]]:
    """Greedy token ids per prompt: each member alone, then the ensemble."""
    runs = {}
    for i, member in enumerate(ens.members):
        alone = ens.with_fusion(main=i, eta=0)
        runs[member.name] = [
            r.token_ids for r in alone.generate(list(PROMPTS), max_new_tokens=new_tokens)
        ]
    runs["ensemble"] = [r.token_ids for r in ens.generate(list(PROMPTS), max_new_tokens=new_tokens)]
    return runs


def main() -> None:
    """Generate in both dtypes and print where they part."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    place = {} if args.device == "cpu" else {"device": args.device}
    by_dtype = {}
    for dtype in ("float32", "bfloat16"):
        ens = Ensemble([MemberSpec(source=n, dtype=dtype, **place) for n in DEFAULT_MEMBERS])
        by_dtype[dtype] = _runs(ens, args.new_tokens)
        del ens
    report = {}
    for who, f32 in by_dtype["float32"].items():
        bf16 = by_dtype["bfloat16"][who]
        parted = []
        for a, b in zip(f32, bf16):
            same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
            parted.append(same if same is not None or len(a) == len(b) else min(len(a), len(b)))
        report[who] = {
            "same": sum(p is None for p in parted),
            "prompts": len(parted),
            "first_difference_at": [p for p in parted if p is not None],
        }
    if args.json:
        print(json.dumps({"new_tokens": args.new_tokens, "compare": report}))
        return
    for who, r in report.items():
        print(
            f"{who:<24} same greedy text on {r['same']}/{r['prompts']} prompts; "
            f"others part at token {r['first_difference_at']}"
        )


if __name__ == "__main__":
    main()
