"""`deepen bench --ray`: members in Ray actors against members in this process, measured
in one run.

    deepen bench --ray                      # the default pair, batch 1, 64 new tokens
    deepen bench --ray --rounds 5 --json    # more rounds, every figure as JSON

Every run gives each member one torch thread: each member alone (transformers `generate`
in this process), the slower of them alone through deepen's own loop (`eta=0`: the
ensembles' forward, sampling and text code without the other member), the in-process
ensemble (its members one after the other) and the Ray ensemble (one actor per member
with 1 CPU and 1 torch thread; fusion in this process). After a short warm-up of each,
the runs are interleaved, round after round (then in reverse order), because a shared
machine's speed drifts; the figures are the medians over rounds of each run's ms/token
and of each round's ratios. Also reported: whether the Ray ensemble chose the in-process
ensemble's very tokens, and the step protocol's payload per step and row, into and out of
each actor (remote/protocol.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ...ensemble import Ensemble
from ...errors import ConfigError
from ..options import fusion_settings, member_specs
from .sections import PROMPTS
from .timing import member_alone

TARGET = 1.25  # the Ray ensemble's ms/token over the slower member's alone, at most
_WARM_UP_TOKENS = 4
# One process reading memory as a member's forward pass reads its weights: GB/s summing a
# 256 MiB float32 tensor on one thread (the bench runs it alone, then two at once).
_BANDWIDTH_PROBE = """
import time, torch
torch.set_num_threads(1)
a = torch.ones(64 * 2**20)
a.sum()
start = time.perf_counter()
for _ in range(10):
    a.sum()
print(10 * a.numel() * 4 / (time.perf_counter() - start) / 1e9)
"""

Run = Callable[[int], dict[str, Any]]  # n new tokens -> {"ms": ms per token, ...}


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
        rounds, slower = _rounds(_Runs(here, ray, prompts), args.new_tokens, args.rounds)
    finally:
        ray.close()
    figures = _summary(here, ray, rounds, slower, args)
    figures["load_seconds"] = {"in_process": round(loaded_here, 1), "ray": round(loaded_ray, 1)}
    figures["memory_bandwidth"] = memory_bandwidth()
    return figures


def memory_bandwidth() -> dict[str, Any]:
    """GB/s of one process reading memory alone, and of each of two at once: members in
    parallel gain only what the machine's memory bandwidth lets two processes read at
    once (a batch-1 forward pass reads all of the member's weights).
    """

    def probe(n: int) -> list[float]:
        command = [sys.executable, "-c", _BANDWIDTH_PROBE]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone, pair = probe(1)[0], probe(2)
    return {
        "one_process_gb_s": round(alone, 2),
        "two_processes_gb_s_each": [round(x, 2) for x in pair],
        "two_over_one": round(sum(pair) / alone, 2),
    }


class _Runs:
    """The compared runs on one batch of prompts; each takes n and gives ms/token."""

    def __init__(self, here: Ensemble, ray: Ensemble, prompts: list[str]) -> None:
        self.here, self.ray, self.prompts = here, ray, prompts

    def alone(self, i: int) -> Run:
        """Member i alone: transformers `generate`."""
        member = self.here.members[i]
        return lambda n: {"ms": member_alone(member, self.prompts, n)[-1] * 1000 / n}

    def engine_alone(self, i: int) -> Run:
        """Member i alone through deepen's loop (`eta=0` runs the main member only)."""
        return self.ensemble(self.here.with_fusion(main=i, eta=0))

    def ensemble(self, ens: Ensemble) -> Run:
        """An ensemble's `generate`, with its tokens and its actors' link counters."""

        def go(n: int) -> dict[str, Any]:
            before = [_counters(m) for m in ens.members]
            cpu, start = time.process_time(), time.perf_counter()
            # standard steps in process too: members in Ray actors do not speculate yet
            results = ens.generate(self.prompts, max_new_tokens=n, min_new_tokens=n, speculate=0)
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu
            after = [_counters(m) for m in ens.members]
            return {
                "ms": wall * 1000 / n,
                "tokens": [r.token_ids for r in results],
                "links": (before, after),
                "wall_seconds": wall,
                "coordinator_cpu_seconds": cpu,
            }

        return go


def _counters(member: Any) -> dict[str, float]:
    """A Ray member's link counters and its actor's CPU seconds so far ({} in process)."""
    if member.remote is None:
        return {}
    return {**member.remote.stats.snapshot(), "cpu_seconds": member.remote.cpu_seconds()}


def _rounds(runs: _Runs, n: int, n_rounds: int) -> tuple[list[dict[str, Any]], str]:
    """A short warm-up of every run, then `n_rounds` interleaved rounds of n tokens (every
    other one in reverse order); also the name of the slower member.
    """
    members = runs.here.members
    named: dict[str, Run] = {m.name: runs.alone(i) for i, m in enumerate(members)}
    warm = {name: run(_WARM_UP_TOKENS)["ms"] for name, run in named.items()}
    slower = max(range(len(members)), key=lambda i: warm[members[i].name])
    named["slower_member_engine"] = runs.engine_alone(slower)
    named["in_process"] = runs.ensemble(runs.here)
    named["ray"] = runs.ensemble(runs.ray)
    for name in list(named)[len(members) :]:
        named[name](_WARM_UP_TOKENS)  # first-call costs: relative rows, actors' threads
    names = list(named)
    rounds = []
    with tqdm(total=len(names) * n_rounds, desc="deepen bench --ray", file=sys.stderr) as bar:
        for r in range(n_rounds):
            measured = {}
            for name in names if r % 2 == 0 else names[::-1]:
                measured[name] = named[name](n)
                bar.update(1)
            rounds.append(measured)
    return rounds, members[slower].name


def _summary(
    here: Ensemble,
    ray: Ensemble,
    rounds: list[dict[str, Any]],
    slower: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Medians of each run and of each round's ratios, tokens compared, payload per row."""
    names = [m.name for m in here.members]
    per_round = [_round_figures(measured, names, slower) for measured in rounds]

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in per_round), 3)

    keys = [k for k in per_round[0] if k != "members_alone_ms"]
    alone = {
        n: round(statistics.median(r["members_alone_ms"][n] for r in per_round), 1) for n in names
    }
    ratio = median("ray_to_slower_member")
    return {
        "members": names,
        "main": here.main.name,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "slower_member": slower,
        "batch_size": args.batch_sizes[0],
        "new_tokens": args.new_tokens,
        "rounds": len(rounds),
        "torch_threads_per_member": 1,
        "ray_actors": [_actor(m) for m in ray.members],
        "median": {"members_alone_ms": alone, **{k: median(k) for k in keys}},
        "target_ray_to_slower_member": TARGET,
        "meets_target": ratio <= TARGET,
        "same_tokens_as_in_process": all(
            r["ray"]["tokens"] == r["in_process"]["tokens"] for r in rounds
        ),
        "protocol": _protocol(ray, rounds),
        "per_round": per_round,
    }


def _round_figures(measured: dict[str, Any], names: list[str], slower: str) -> dict[str, Any]:
    alone = {name: measured[name]["ms"] for name in names}
    total = sum(alone.values())
    ray_ms, here_ms = measured["ray"]["ms"], measured["in_process"]["ms"]
    engine_ms = measured["slower_member_engine"]["ms"]
    return {
        "members_alone_ms": {k: round(v, 1) for k, v in alone.items()},
        "sum_of_members_ms": round(total, 1),
        "slower_member_engine_ms": round(engine_ms, 1),
        "in_process_ms": round(here_ms, 1),
        "ray_ms": round(ray_ms, 1),
        "ray_to_slower_member": round(ray_ms / alone[slower], 3),
        "ray_to_slower_member_engine": round(ray_ms / engine_ms, 3),
        "ray_to_in_process": round(ray_ms / here_ms, 3),
        "in_process_to_sum": round(here_ms / total, 3),
    }


def _actor(member: Any) -> dict[str, Any]:
    info = member.remote.info
    return {"name": member.name, "node": info.node, "pid": info.pid, "threads": info.torch_threads}


def _protocol(ray: Ensemble, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per member: mean payload bytes per step and row, into and out of its actor, and the
    coordinator's wait per call beyond the actor's forward pass (Ray's own cost).
    """
    out = {}
    runs_wall = sum(m["ray"]["wall_seconds"] for m in rounds)
    for i, member in enumerate(ray.members):
        keys = ("calls", "row_steps", "sent_bytes", "received_bytes", "wall_seconds")
        total = dict.fromkeys((*keys, "actor_seconds", "cpu_seconds"), 0.0)
        for measured in rounds:
            before, after = measured["ray"]["links"]
            for key in total:
                total[key] += after[i][key] - before[i][key]
        rows, calls = max(total["row_steps"], 1), max(total["calls"], 1)
        out[member.name] = {
            "role": "main" if i == ray.fusion.main else "helper",
            "sent_bytes_per_row_step": round(total["sent_bytes"] / rows, 1),
            "received_bytes_per_row_step": round(total["received_bytes"] / rows, 1),
            "forward_ms_per_call": round(total["actor_seconds"] * 1000 / calls, 1),
            "overhead_ms_per_call": round(
                (total["wall_seconds"] - total["actor_seconds"]) * 1000 / calls, 2
            ),
            "actor_cpu_share": round(total["cpu_seconds"] / runs_wall, 3),
        }
    coordinator = sum(m["ray"]["coordinator_cpu_seconds"] for m in rounds)
    out["coordinator_cpu_share"] = round(coordinator / runs_wall, 3)
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
    rows = [(f"{name} alone (generate)", ms) for name, ms in m["members_alone_ms"].items()]
    rows += [
        (f"{f['slower_member']} alone (deepen, eta=0)", m["slower_member_engine_ms"]),
        ("sum of members", m["sum_of_members_ms"]),
        ("in-process ensemble", m["in_process_ms"]),
        ("Ray ensemble", m["ray_ms"]),
    ]
    for label, ms in rows:
        print(f"  {label:<46}{ms:>9.1f}")
    print(
        f"\nRay / slower member alone {m['ray_to_slower_member']:.2f} (target <= "
        f"{f['target_ray_to_slower_member']}: {'met' if f['meets_target'] else 'NOT met'}; "
        f"{m['ray_to_slower_member_engine']:.2f} against it through deepen's loop); "
        f"Ray / in-process {m['ray_to_in_process']:.2f}; in-process / sum "
        f"{m['in_process_to_sum']:.2f}"
    )
    print(f"same tokens as in process: {f['same_tokens_as_in_process']}")
    bw = f["memory_bandwidth"]
    print(
        f"memory bandwidth: {bw['one_process_gb_s']:.1f} GB/s for one process, "
        f"{' + '.join(f'{x:.1f}' for x in bw['two_processes_gb_s_each'])} GB/s for two at "
        f"once ({bw['two_over_one']:.2f} x)"
    )
    print("\nRay actors: payload per step and row, time per call, CPU share while running")
    for name, p in f["protocol"].items():
        if name == "coordinator_cpu_share":
            continue
        print(
            f"  {name} ({p['role']}): in {p['sent_bytes_per_row_step']:.0f} B, out "
            f"{p['received_bytes_per_row_step']:.0f} B; forward {p['forward_ms_per_call']:.1f} "
            f"ms + Ray's wait beyond it {p['overhead_ms_per_call']:.1f} ms; "
            f"{p['actor_cpu_share']:.0%} of a core"
        )
    print(f"  coordinator: {f['protocol']['coordinator_cpu_share']:.0%} of a core")
