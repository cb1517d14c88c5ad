"""`deepen bench --load` (commands/bench/load.py): each member loads in a fresh process and
its figures add up (tiny members saved as folders; Linux /proc needed). One command run
spawns the tier's only processes: one member load and one tokenizer load; how `--repeat`
interleaves the loads and keeps the median run is checked on stand-in processes.
"""

from __future__ import annotations

import json

from deepen_engine import MemberSpec
from deepen_engine.commands.bench import command, load
from deepen_engine.commands.bench.load import load_table
from deepen_engine.commands.cli import main


def test_bench_load_command_figures_of_a_bfloat16_member(tiny_folders, capsys):
    argv = ["bench", "--load", "-m", tiny_folders[0], "--dtype", "bfloat16", "--json"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)["load"]
    assert row["dtype"] == "bfloat16"
    # tied embeddings counted once, two bytes a parameter
    assert row["weights_mb"] == round(row["parameters"] * 2 / 2**20, 1)
    assert row["added_peak_mb"] == round(row["peak_mb"] - row["rss_before_mb"], 1)
    assert row["peak_mb"] >= row["load_peak_mb"] >= row["rss_before_mb"]
    # one run (the default), its figures kept (`--repeat`: the next test)
    assert row["runs_load_seconds"] == [row["load_seconds"]]
    assert row["runs_peak_ratio"] == [row["peak_ratio"]]
    # the tokenizer's own process: what it keeps is part of its peak
    assert row["tokenizer_peak_mb"] >= row["tokenizer_mb"]
    weights_added = row["added_peak_mb"] - row["tokenizer_mb"]
    assert row["weights_peak_ratio"] == round(weights_added / row["weights_mb"], 3)
    table = load_table([row])
    assert row["member"] in table and f"{row['tokenizer_peak_mb']:.1f}" in table


def test_bench_load_repeats_interleave_and_keep_the_median_run(tiny_folders, monkeypatch, capsys):
    """`--repeat 3` on two members: loads interleaved (a, b, a, b, a, b), each member's
    median run by load time kept with every run's seconds and peak ratio, its tokenizer
    measured once; the child processes are stand-ins that return set figures."""
    calls: list[tuple[str, str]] = []
    seconds = {tiny_folders[0]: [0.3, 0.1, 0.2], tiny_folders[1]: [0.5, 0.6, 0.4]}

    def child(spec, what="member"):
        source = str(spec.source)
        calls.append((source, what))
        if what == "tokenizer":
            return {"tokenizer_mb": 1.0, "tokenizer_peak_mb": 2.0}
        run = sum(1 for c in calls if c == (source, "member")) - 1
        s = seconds[source][run]
        return {"member": source, "load_seconds": s, "added_peak_mb": 10 * s, "weights_mb": 2.0,
                "peak_ratio": s * 5}  # fmt: skip

    monkeypatch.setattr(load, "_measure_in_child", child)
    argv = ["bench", "--load", "-m", tiny_folders[0], "-m", tiny_folders[1], "--repeat", "3"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["load"]
    a, b = tiny_folders
    loads = [(a, "member"), (b, "member")] * 3
    assert calls == [*loads, (a, "tokenizer"), (b, "tokenizer")]
    assert [r["runs_load_seconds"] for r in rows] == [seconds[a], seconds[b]]
    assert [r["load_seconds"] for r in rows] == [0.2, 0.5]  # the median of each
    assert [r["runs_peak_ratio"] for r in rows] == [[s * 5 for s in seconds[m]] for m in (a, b)]
    assert [r["peak_ratio"] for r in rows] == [0.2 * 5, 0.5 * 5]  # the median run's own
    assert [r["weights_peak_ratio"] for r in rows] == [
        round((10 * s - 1.0) / 2.0, 3) for s in (0.2, 0.5)
    ]


def test_bench_load_passes_the_default_dtype_and_repeat(tiny_folders, monkeypatch, capsys):
    seen: list[tuple[list[MemberSpec], int]] = []

    def load_costs(specs, repeat=1):  # no process: what the command asks for
        seen.append((specs, repeat))
        return []

    monkeypatch.setattr(command, "load_costs", load_costs)
    assert main(["bench", "--load", "-m", tiny_folders[1], "--json"]) == 0
    ((specs, repeat),) = seen
    assert [s.dtype for s in specs] == ["float32"] and repeat == 1
    assert json.loads(capsys.readouterr().out)["load"] == []


def test_bench_load_is_a_benchmark_of_its_own(tiny_folders, capsys):
    assert main(["bench", "--load", "--serving", "-m", tiny_folders[0]]) != 0
    assert "--load is a benchmark of its own: leave out --ray" in capsys.readouterr().err
