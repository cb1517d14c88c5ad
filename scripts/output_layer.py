"""What a large output layer costs over a few rows on this machine, two ways (issue 22).

    python scripts/output_layer.py [--rows 1 2 4 8 16] [--rounds 7] [--json]
    HF_HUB_OFFLINE=1 python scripts/output_layer.py --generate [--batch-sizes 1 8]


`torch.nn.functional.linear(hidden, weight)` (what a model's `lm_head` runs) against
`(weight @ hidden.T).T` (what the engine's output layer runs on the CPU for 2 to 64 rows,
deepen_engine/members/output_layer.py), over a random layer of each default member's
shape: Gemma-3-270m's (262,144 x 640) and SmolLM2-135M's (49,152 x 576), float32. Both
compute the same product. Interleaved over the rounds; medians in ms.

`--generate`: the default pair's greedy fused decoding (the bench's prompts, `--new-tokens`
each) as deepen runs it ("engine": its output layer, members/output_layer.py, and few-row
products, members/few_rows.py) against each model's own forward with plain `linear` calls
("model": `Member.output_layer` set to None and the few-row mode off), interleaved over the
rounds: median tokens/s of each and the median ratio of paired rounds, per batch size, and
whether the texts are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

SHAPES = {"gemma-3-270m": (262_144, 640), "smollm2-135m": (49_152, 576)}


def _transposed(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight @ hidden.T).T.contiguous()


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _generate(args: argparse.Namespace) -> dict[str, dict[str, float | bool]]:
    from deepen_engine import Ensemble, GenerationConfig
    from deepen_engine.commands.bench.sections import PROMPTS
    from deepen_engine.decoding import member_forward

    few_rows = getattr(member_forward, "few_row_products")  # noqa: B009 (swapped below)

    ens = Ensemble()
    layers = [m.output_layer for m in ens.members]
    config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    out: dict[str, dict[str, float | bool]] = {}
    for size in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        rates: dict[str, list[float]] = {"engine": [], "model": []}
        texts: dict[str, list[str]] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for how in ("engine", "model") if r % 2 else ("model", "engine"):
                for member, layer in zip(ens.members, layers):
                    member.output_layer = layer if how == "engine" else None
                plain = contextlib.nullcontext
                mode = few_rows if how == "engine" else plain
                setattr(member_forward, "few_row_products", mode)  # noqa: B010
                start = time.perf_counter()
                results = ens.generate(prompts, config)
                seconds = time.perf_counter() - start
                texts[how] = [res.text for res in results]
                if r:
                    rates[how].append(size * args.new_tokens / seconds)
        setattr(member_forward, "few_row_products", few_rows)  # noqa: B010
        for member, layer in zip(ens.members, layers):
            member.output_layer = layer
        ratios = [a / b for a, b in zip(rates["engine"], rates["model"])]
        out[f"batch {size}"] = {
            "engine tokens/s": round(statistics.median(rates["engine"]), 2),
            "model tokens/s": round(statistics.median(rates["model"]), 2),
            "median ratio": round(statistics.median(ratios), 3),
            "same text": texts["engine"] == texts["model"],
        }
    ens.close()
    return out


def main() -> None:
    """Time both products and print their medians."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--generate", action="store_true", help="time fused decoding instead")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per row (16)")
    args = parser.parse_args()
    if args.generate:
        result = _generate(args)
        print(
            json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items())
        )
        return
    torch.manual_seed(0)
    out: dict[str, dict[str, dict[str, float]]] = {}
    with torch.no_grad():
        for name, (vocab, dim) in SHAPES.items():
            weight = torch.randn(vocab, dim)
            cases: dict[tuple[int, str], Callable[[], object]] = {}
            for n in args.rows:
                hidden = torch.randn(n, dim)
                cases[(n, "linear")] = partial(torch.nn.functional.linear, hidden, weight)
                cases[(n, "weight @ hidden.T")] = partial(_transposed, hidden, weight)
            times: dict[tuple[int, str], list[float]] = {key: [] for key in cases}
            for fn in cases.values():  # warm up
                fn()
            for _ in range(args.rounds):
                for key, fn in cases.items():
                    times[key].append(_ms(fn))
            out[name] = {}
            for (n, how), values in times.items():
                out[name].setdefault(f"{n} rows", {})[how] = round(statistics.median(values), 1)
    if args.json:
        print(json.dumps(out))
        return
    for name, rows in out.items():
        for n, row in rows.items():
            print(f"{name}, {n}: " + ", ".join(f"{how} {ms} ms" for how, ms in row.items()))


if __name__ == "__main__":
    main()
