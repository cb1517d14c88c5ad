"""`deepen bench --load` (commands/bench/load.py): each member loads in a fresh process and
its figures add up (tiny members saved as folders; Linux /proc needed). One command run
spawns the tier's only processes: two member loads (`--repeat 2`) and one tokenizer load.
"""

from __future__ import annotations

import json

from deepen_engine import MemberSpec
from deepen_engine.commands.bench import command
from deepen_engine.commands.bench.load import load_table
from deepen_engine.commands.cli import main


def test_bench_load_command_figures_of_a_bfloat16_member(tiny_folders, capsys):
    argv = ["bench", "--load", "-m", tiny_folders[0], "--dtype", "bfloat16", "--json"]
    assert main([*argv, "--repeat", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["load"]
    assert row["dtype"] == "bfloat16"
    # tied embeddings counted once, two bytes a parameter
    assert row["weights_mb"] == round(row["parameters"] * 2 / 2**20, 1)
    assert row["added_peak_mb"] == round(row["peak_mb"] - row["rss_before_mb"], 1)
    assert row["peak_mb"] >= row["load_peak_mb"] >= row["rss_before_mb"]
    # two interleaved runs, the median one's figures kept
    assert len(row["runs_load_seconds"]) == 2 and row["load_seconds"] in row["runs_load_seconds"]
    assert row["peak_ratio"] in row["runs_peak_ratio"]
    # the tokenizer's own process: what it keeps is part of its peak
    assert row["tokenizer_peak_mb"] >= row["tokenizer_mb"]
    weights_added = row["added_peak_mb"] - row["tokenizer_mb"]
    assert row["weights_peak_ratio"] == round(weights_added / row["weights_mb"], 3)
    table = load_table([row])
    assert row["member"] in table and f"{row['tokenizer_peak_mb']:.1f}" in table


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
