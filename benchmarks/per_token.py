"""Milliseconds per generated token: each member alone vs the ensemble, and batch throughput.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/per_token.py --new-tokens 64 [--json]

- Members alone: plain transformers `generate` with its KV cache, same prompt, greedy,
  exactly N new tokens (min_new_tokens), median of `--repeats` runs.
- Ensemble: `Ensemble.generate` on the default members (greedy, N new tokens). The first
  run starts with empty relative-row caches ("cold"); later runs reuse the rows of tokens
  already seen ("warm", the steady state of a long-lived process). Its time is split into
  member forwards and everything else (fusion, sampling, sync, text).
- Throughput: B distinct prompts decoded together, generated tokens per second of wall
  time (rows may stop early at EOS).

Prints a table (or JSON); asserts nothing. Timings on a shared CPU vary by 10-30% from run
to run: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from deepen_engine import Ensemble  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def member_alone_ms(member, prompt: str, n: int, repeats: int) -> float:
    ids = member.tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        pad_token_id=member.tokenizer.pad_token_id,
    )
    member.model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        member.model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        times.append((time.perf_counter() - start) * 1000 / n)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)

    ens = Ensemble()
    n = args.new_tokens
    alone = {m.name: member_alone_ms(m, args.prompt, n, args.repeats) for m in ens.members}
    total_ms, forward_ms, other_ms = [], [], []
    for _ in range(1 + args.repeats):  # the first run is cold
        result = ens.generate(args.prompt, max_new_tokens=n)
        usage = result.usage
        tokens = usage.completion_tokens
        total_ms.append(usage.total_seconds * 1000 / tokens)
        forward_ms.append(sum(usage.forward_seconds.values()) * 1000 / tokens)
        other_ms.append(usage.fusion_seconds * 1000 / tokens)
    warm = statistics.median(total_ms[1:])
    sum_alone = sum(alone.values())
    figures = {
        "new_tokens": tokens,
        "members_alone_ms_per_token": {k: round(v, 1) for k, v in alone.items()},
        "sum_of_members_ms_per_token": round(sum_alone, 1),
        "ensemble_cold_ms_per_token": round(total_ms[0], 1),
        "ensemble_warm_ms_per_token": round(warm, 1),
        "ensemble_warm_member_forwards_ms_per_token": round(statistics.median(forward_ms[1:]), 1),
        "ensemble_warm_fusion_and_sync_ms_per_token": round(statistics.median(other_ms[1:]), 1),
        "ensemble_cold_fusion_and_sync_ms_per_token": round(other_ms[0], 1),
        "ratio_warm_ensemble_to_sum_of_members": round(warm / sum_alone, 3),
        "ratio_cold_ensemble_to_sum_of_members": round(total_ms[0] / sum_alone, 3),
        "fed_positions": usage.fed_positions,
        "text": result.text,
        "throughput_tokens_per_second": {},
    }
    for size in args.batch_sizes:
        prompts = [f"{args.prompt} (part {i + 1})" for i in range(size)]
        start = time.perf_counter()
        results = ens.generate(prompts, max_new_tokens=n)
        seconds = time.perf_counter() - start
        generated = sum(r.usage.completion_tokens for r in results)
        figures["throughput_tokens_per_second"][size] = round(generated / seconds, 1)
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
        return
    for key, value in figures.items():
        print(f"{key:45} {value}")


if __name__ == "__main__":
    main()
