"""Milliseconds per generated token: each member alone vs the ensemble (batch 1, greedy).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/per_token.py --new-tokens 64 [--json]

Members alone run plain transformers `generate` with its KV cache on the same prompt and
length (min_new_tokens forces the length). The ensemble row splits its time into member
forwards and fusion + sync. Then batch throughput: B distinct prompts decoded together
(tokens generated per second of wall time; rows may stop early at EOS). Prints a table (or
JSON); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from deepen_engine import Ensemble  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def member_alone_ms(member, prompt: str, n: int) -> float:
    ids = member.tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        pad_token_id=member.tokenizer.pad_token_id,
    )
    member.model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    start = time.perf_counter()
    member.model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
    return (time.perf_counter() - start) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)

    ens = Ensemble()
    n = args.new_tokens
    alone = {m.name: member_alone_ms(m, args.prompt, n) for m in ens.members}
    ens.generate(args.prompt, max_new_tokens=4)  # warm-up
    result = ens.generate(args.prompt, max_new_tokens=n)
    usage = result.usage
    tokens = usage.completion_tokens
    figures = {
        "new_tokens": tokens,
        "members_alone_ms_per_token": {k: round(v, 1) for k, v in alone.items()},
        "sum_of_members_ms_per_token": round(sum(alone.values()), 1),
        "ensemble_ms_per_token": round(usage.total_seconds * 1000 / tokens, 1),
        "ensemble_member_forward_ms_per_token": {
            k: round(v * 1000 / tokens, 1) for k, v in usage.forward_seconds.items()
        },
        "ensemble_fusion_and_sync_ms_per_token": round(usage.fusion_seconds * 1000 / tokens, 1),
        "ratio_ensemble_to_sum": round(
            usage.total_seconds * 1000 / tokens / sum(alone.values()), 3
        ),
        "fed_positions": usage.fed_positions,
        "text": result.text,
        "throughput_tokens_per_second": {},
    }
    # Throughput: B copies of distinct prompts decoded together, fixed length.
    for size in args.batch_sizes:
        prompts = [f"{args.prompt} (part {i + 1})" for i in range(size)]
        start = time.perf_counter()
        results = ens.generate(prompts, max_new_tokens=n)
        seconds = time.perf_counter() - start
        tokens = sum(r.usage.completion_tokens for r in results)
        figures["throughput_tokens_per_second"][size] = round(tokens / seconds, 1)
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
        return
    for key, value in figures.items():
        print(f"{key:40} {value}")


if __name__ == "__main__":
    main()
