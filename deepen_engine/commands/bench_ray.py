"""`deepen bench --ray`: members in Ray actors against members in this process, measured
in one run.

    deepen bench --ray                      # the default pair, batch 1, 64 new tokens
    deepen bench --ray --rounds 5 --json    # more rounds, every figure as JSON

Every run gives each member one torch thread: each member alone (transformers `generate`
in this process), the in-process ensemble (its members one after the other) and the Ray
ensemble (one actor per member with 1 CPU and 1 torch thread; fusion in this process).
The runs are interleaved, round after round (A, B, in-process, Ray; then the reverse
order), because a shared machine's speed drifts; the figures are the medians over rounds
of each run's ms/token and of each round's ratios. Also reported: whether the Ray
ensemble chose the in-process ensemble's very tokens, and the step protocol's payload per
step and row, in and out of each actor (decoding/step_protocol.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..ensemble import Ensemble
from ..errors import ConfigError
from .bench_sections import PROMPTS
from .bench_timing import member_alone
from .options import fusion_settings, member_specs

TARGET = 1.25  # the Ray ensemble's ms/token over the slower member's alone, at most


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    """Load both ensembles, run the interleaved rounds; every figure, as a dict."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # members alone, the in-process ensemble, and fusion
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(previous)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    here = Ensemble(member_specs(args, ray=False), **fusion_settings(args))
    loaded_here = time.perf_counter() - start
    if len(here.members) < 2:
        raise ConfigError("deepen bench compares an ensemble with its members: give 2 or more.")
    start = time.perf_counter()
    ray = Ensemble(member_specs(args, ray=True), **fusion_settings(args))
    loaded_ray = time.perf_counter() - start
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_sizes[0])]
        runs = _runs(here, ray, prompts, args.new_tokens)
        rounds = _rounds(runs, args.rounds)
    finally:
        ray.close()
    figures = _summary(here, ray, rounds, args)
    figures["load_seconds"] = {"in_process": round(loaded_here, 1), "ray": round(loaded_ray, 1)}
    return figures


def _runs(
    here: Ensemble, ray: Ensemble, prompts: list[str], n: int
) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each compared run: name -> a function giving its ms/token (and what it saw)."""

    def alone(i: int) -> Callable[[], dict[str, Any]]:
        member = here.members[i]
        return lambda: {"ms": member_alone(member, prompts, n)[-1] * 1000 / n}

    def ensemble(ens: Ensemble) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            before = [m.remote.stats.snapshot() if m.remote else None for m in ens.members]
            start = time.perf_counter()
            results = ens.generate(prompts, max_new_tokens=n, min_new_tokens=n)
            ms = (time.perf_counter() - start) * 1000 / n
            after = [m.remote.stats.snapshot() if m.remote else None for m in ens.members]
            return {"ms": ms, "tokens": [r.token_ids for r in results], "links": (before, after)}

        return go

    runs = {m.name: alone(i) for i, m in enumerate(here.members)}
    runs["in_process"] = ensemble(here)
    runs["ray"] = ensemble(ray)
    return runs


def _rounds(runs: dict[str, Callable[[], dict[str, Any]]], n_rounds: int) -> list[dict[str, Any]]:
    """Warm every run up once, then `n_rounds` rounds, every other one in reverse order."""
    names = list(runs)
    with tqdm(total=len(names) * (n_rounds + 1), desc="deepen bench --ray", file=sys.stderr) as bar:
        for name in names:
            runs[name]()  # warm-up: first-call costs (row caches, allocator, actors' threads)
            bar.update(1)
        rounds = []
        for r in range(n_rounds):
            order = names if r % 2 == 0 else names[::-1]
            measured = {}
            for name in order:
                measured[name] = runs[name]()
                bar.update(1)
            rounds.append(measured)
    return rounds


def _summary(
    here: Ensemble, ray: Ensemble, rounds: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Medians of each run and of each round's ratios, tokens compared, payload per row."""
    names = [m.name for m in here.members]
    per_round = []
    for measured in rounds:
        alone = {name: measured[name]["ms"] for name in names}
        slower, total = max(alone.values()), sum(alone.values())
        ray_ms, here_ms = measured["ray"]["ms"], measured["in_process"]["ms"]
        per_round.append(
            {
                "members_alone_ms": {k: round(v, 1) for k, v in alone.items()},
                "sum_of_members_ms": round(total, 1),
                "in_process_ms": round(here_ms, 1),
                "ray_ms": round(ray_ms, 1),
                "ray_to_slower_member": round(ray_ms / slower, 3),
                "ray_to_in_process": round(ray_ms / here_ms, 3),
                "in_process_to_sum": round(here_ms / total, 3),
            }
        )

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in per_round), 3)

    ratio = median("ray_to_slower_member")
    return {
        "members": names,
        "main": here.main.name,
        "batch_size": args.batch_sizes[0],
        "new_tokens": args.new_tokens,
        "rounds": len(rounds),
        "torch_threads_per_member": 1,
        "ray_actors": [_actor(m) for m in ray.members],
        "median": {
            "members_alone_ms": {
                n: round(statistics.median(r["members_alone_ms"][n] for r in per_round), 1)
                for n in names
            },
            "sum_of_members_ms": median("sum_of_members_ms"),
            "in_process_ms": median("in_process_ms"),
            "ray_ms": median("ray_ms"),
            "ray_to_slower_member": ratio,
            "ray_to_in_process": median("ray_to_in_process"),
            "in_process_to_sum": median("in_process_to_sum"),
        },
        "target_ray_to_slower_member": TARGET,
        "meets_target": ratio <= TARGET,
        "same_tokens_as_in_process": all(
            r["ray"]["tokens"] == r["in_process"]["tokens"] for r in rounds
        ),
        "protocol": _protocol(ray, rounds),
        "per_round": per_round,
    }


def _actor(member: Any) -> dict[str, Any]:
    info = member.remote.info
    return {"name": member.name, "node": info.node, "pid": info.pid, "threads": info.torch_threads}


def _protocol(ray: Ensemble, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per member: mean payload bytes per step and row, into and out of its actor, and the
    coordinator's wait per call beyond the actor's forward pass (Ray's own cost).
    """
    out = {}
    for i, member in enumerate(ray.members):
        keys = ("calls", "row_steps", "sent_bytes", "received_bytes", "wall_seconds")
        total = dict.fromkeys((*keys, "actor_seconds"), 0.0)
        for measured in rounds:
            before, after = measured["ray"]["links"]
            for key in total:
                total[key] += after[i][key] - before[i][key]
        rows, calls = max(total["row_steps"], 1), max(total["calls"], 1)
        out[member.name] = {
            "role": "main" if i == ray.fusion.main else "helper",
            "sent_bytes_per_row_step": round(total["sent_bytes"] / rows, 1),
            "received_bytes_per_row_step": round(total["received_bytes"] / rows, 1),
            "overhead_ms_per_call": round(
                (total["wall_seconds"] - total["actor_seconds"]) * 1000 / calls, 2
            ),
        }
    return out


def print_ray(f: dict[str, Any]) -> None:
    """The figures of `run_ray` as a table."""
    m = f["median"]
    print(
        f"members {' + '.join(f['members'])} (main {f['main']}), batch {f['batch_size']}, "
        f"{f['new_tokens']} new tokens, 1 torch thread per member, median of {f['rounds']} "
        "interleaved rounds"
    )
    print("\nms per token")
    for name, ms in m["members_alone_ms"].items():
        print(f"  {name + ' alone':<34}{ms:>9.1f}")
    print(f"  {'sum of members':<34}{m['sum_of_members_ms']:>9.1f}")
    print(f"  {'in-process ensemble':<34}{m['in_process_ms']:>9.1f}")
    print(f"  {'Ray ensemble':<34}{m['ray_ms']:>9.1f}")
    print(
        f"\nRay / slower member alone {m['ray_to_slower_member']:.2f} (target <= "
        f"{f['target_ray_to_slower_member']}: {'met' if f['meets_target'] else 'NOT met'}); "
        f"Ray / in-process {m['ray_to_in_process']:.2f}; in-process / sum "
        f"{m['in_process_to_sum']:.2f}"
    )
    print(f"same tokens as in process: {f['same_tokens_as_in_process']}")
    print("\nstep protocol, per step and row (payload bytes)")
    for name, p in f["protocol"].items():
        print(
            f"  {name} ({p['role']}): in {p['sent_bytes_per_row_step']:.0f} B, out "
            f"{p['received_bytes_per_row_step']:.0f} B; Ray's wait beyond the forward "
            f"{p['overhead_ms_per_call']:.1f} ms per call"
        )
