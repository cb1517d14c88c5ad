"""What a member's forward over several new positions costs against one (issue 22).

    HF_HUB_OFFLINE=1 python scripts/forward_positions.py [--positions 4] [--rounds 8] [--json]

Speculative decoding pays when reading k drafted positions in one forward costs little
more than reading one. For each default member, after a prefill of a bench prompt, it times
one forward over 1 new position, over k positions keeping only the last position's logits
(the body), and over k positions keeping every position's logits (what a verification
forward needs: the output layer runs k times), interleaved over the rounds; medians in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deepen_engine import Ensemble
from deepen_engine.commands.bench.sections import PROMPTS


def _time(model: torch.nn.Module, prompt: torch.Tensor, width: int, keep: int) -> float:
    """Seconds of one forward over `width` new ids after `prompt`, keeping `keep` logits."""
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        new = torch.randint(100, 1000, (1, width))
        start = time.perf_counter()
        model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return time.perf_counter() - start


def main() -> None:
    """Time the forwards and print their medians."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--positions", type=int, default=4, help="new positions k (4)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (8)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    ens = Ensemble()
    k, out = args.positions, {}
    for member in ens.members:
        prompt = member.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        kinds = {"1 position": (1, 1), f"{k} positions, last logits": (k, 1)}
        kinds[f"{k} positions, all logits"] = (k, k)
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for width, keep in kinds.values():  # warm up: first calls allocate
            _time(member.model, prompt, width, keep)
        for _ in range(args.rounds):
            for name, (width, keep) in kinds.items():
                times[name].append(_time(member.model, prompt, width, keep))
        out[member.name] = {
            name: round(statistics.median(v) * 1000, 1) for name, v in times.items()
        }
    ens.close()
    if args.json:
        print(json.dumps(out))
        return
    for name, row in out.items():
        print(name + ": " + ", ".join(f"{kind} {ms} ms" for kind, ms in row.items()))


if __name__ == "__main__":
    main()
