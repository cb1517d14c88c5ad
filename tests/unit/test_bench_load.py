"""`deepen bench --load` (commands/bench/load.py): each member loads in a fresh process and
its figures add up (tiny members saved as folders; Linux /proc needed)."""

from __future__ import annotations

import json

from deepen_engine import MemberSpec
from deepen_engine.commands.bench.load import load_costs, load_table
from deepen_engine.commands.cli import main


def test_load_figures_of_a_bfloat16_member(tiny_folders):
    (row,) = load_costs([MemberSpec(source=tiny_folders[0], dtype="bfloat16")])
    assert row["dtype"] == "bfloat16"
    # tied embeddings counted once, two bytes a parameter
    assert row["weights_mb"] == round(row["parameters"] * 2 / 2**20, 1)
    assert row["added_peak_mb"] == round(row["peak_mb"] - row["rss_before_mb"], 1)
    assert row["peak_mb"] >= row["load_peak_mb"] >= row["rss_before_mb"]
    assert row["runs_load_seconds"] == [row["load_seconds"]]
    assert "tokenizer_mb" in row and "weights_peak_ratio" in row
    assert row["member"] in load_table([row])


def test_bench_load_command(tiny_folders, capsys):
    assert main(["bench", "--load", "-m", tiny_folders[1], "--json", "--repeat", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["load"]
    assert row["dtype"] == "float32" and len(row["runs_load_seconds"]) == 2


def test_bench_load_is_a_benchmark_of_its_own(tiny_folders, capsys):
    assert main(["bench", "--load", "--serving", "-m", tiny_folders[0]]) != 0
    assert "--load is a benchmark of its own: leave out --ray" in capsys.readouterr().err
