"""`deepen bench --ray` without Ray: its flags, and the figures it derives from measured
rounds (medians of runs and of per-round ratios, payload and CPU share per actor)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from deepen_engine.commands.bench import ray as ray_bench
from deepen_engine.commands.cli import main

NAMES = ["big", "small"]


def test_ray_flag_refuses_other_benchmarks(capsys):
    assert main(["bench", "--ray", "--serving"]) == 2
    assert "--ray is a benchmark of its own: leave out --serving" in capsys.readouterr().err
    assert main(["bench", "--ray", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1, got 0." in capsys.readouterr().err


def _member(name, pid):
    info = SimpleNamespace(node="n1", pid=pid, torch_threads=1)
    return SimpleNamespace(name=name, remote=SimpleNamespace(info=info))


def _links(calls, rows, received, wall, actor, cpu):
    before = [
        dict.fromkeys(
            (
                "calls",
                "row_steps",
                "sent_bytes",
                "received_bytes",
                "wall_seconds",
                "actor_seconds",
                "cpu_seconds",
            ),
            0.0,
        )
    ] * 2
    after = [
        {"calls": calls, "row_steps": rows, "sent_bytes": 40.0 * rows,
         "received_bytes": r, "wall_seconds": wall, "actor_seconds": actor, "cpu_seconds": cpu}
        for r in received
    ]  # fmt: skip
    return before, after


def _round(big, small, engine, here, ray):
    return {
        "big": {"ms": big},
        "small": {"ms": small},
        "slower_member_engine": {"ms": engine},
        "in_process": {"ms": here, "tokens": [[1, 2]]},
        "ray": {
            "ms": ray,
            "tokens": [[1, 2]],
            "wall_seconds": 2.0,
            "coordinator_cpu_seconds": 0.2,
            "links": _links(10, 10, [4000.0, 500.0], 1.5, 1.0, 1.0),
        },
    }


def test_summary_takes_medians_of_runs_and_of_each_rounds_ratios():
    here = SimpleNamespace(
        members=[SimpleNamespace(name=n) for n in NAMES], main=SimpleNamespace(name="big")
    )
    ray = SimpleNamespace(
        members=[_member("big", 1), _member("small", 2)], fusion=SimpleNamespace(main=0)
    )
    rounds = [
        _round(100, 50, 110, 160, 120),  # ray / slower 1.2
        _round(200, 60, 210, 270, 300),  # 1.5
        _round(100, 40, 105, 150, 110),  # 1.1
    ]
    args = argparse.Namespace(batch_sizes=[1], new_tokens=8)
    f = ray_bench._summary(here, ray, rounds, "big", args)
    m = f["median"]
    assert m["members_alone_ms"] == {"big": 100.0, "small": 50.0}
    assert m["ray_ms"] == 120 and m["in_process_ms"] == 160
    assert m["ray_to_slower_member"] == 1.2  # the median of 1.2, 1.5, 1.1
    assert m["in_process_to_sum"] == pytest.approx(160 / 150, abs=1e-3)
    assert f["meets_target"] is True and f["same_tokens_as_in_process"] is True
    big = f["protocol"]["big"]
    # 3 rounds x 10 row-steps; 4000 bytes out per round
    assert big["received_bytes_per_row_step"] == pytest.approx(4000 / 10)
    assert big["sent_bytes_per_row_step"] == 40.0
    assert big["forward_ms_per_call"] == 100.0 and big["overhead_ms_per_call"] == 50.0
    assert big["actor_cpu_share"] == 0.5  # 3 s of CPU over 6 s of Ray runs
    assert f["protocol"]["coordinator_cpu_share"] == 0.1
    rounds[1]["ray"]["tokens"] = [[1, 3]]
    assert ray_bench._summary(here, ray, rounds, "big", args)["same_tokens_as_in_process"] is False
