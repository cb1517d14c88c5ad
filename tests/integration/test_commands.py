"""`deepen bench` and `deepen eval --sweep-eta` on the default members, small settings."""

from __future__ import annotations

import json

import pytest

from deepen_engine.commands.cli import main

pytestmark = pytest.mark.integration

NAMES = ["gemma-3-270m", "smollm2-135m-instruct"]


def test_bench_on_the_default_members(capsys):
    flags = ["--new-tokens", "4", "--batch-sizes", "1", "--long-tokens", "16"]
    flags += ["--fidelity-prompts", "1", "--fidelity-tokens", "2", "--leftout-mass", "0.01"]
    assert main(["bench", *flags, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["members"] == NAMES and figures["main"] == NAMES[0]
    (row,) = figures["speed"]["rows"]
    assert set(row["members_alone_ms"]) == set(NAMES)
    assert row["ensemble_ms"] > 0 and 0 < row["fusion_only_share"] < 1
    assert figures["length"]["baseline_same_tokens_as_ensemble"] is True
    memory = figures["memory"]
    # Gemma-3-270m holds ~268M float32 parameters, SmolLM2 ~135M
    assert 900 < memory["weights_mb"]["gemma-3-270m"] < 1200
    assert 400 < memory["weights_mb"]["smollm2-135m-instruct"] < 600
    assert memory["peak_rss_mb"] > sum(memory["weights_mb"].values())
    fidelity = figures["fidelity"]
    assert fidelity["steps"] == 2
    assert all(m <= 0.01 for m in fidelity["max_leftout_mass"].values())


def test_eval_sweep_on_the_default_members(tmp_path, capsys):
    flags = ["--dev-size", "4", "--sweep-eta", "0", "0.15", "--sweep-main", "0", "1"]
    flags += ["--sweep-output", str(tmp_path / "sweep"), "--output", str(tmp_path / "a.jsonl")]
    assert main(["eval", *flags, "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert [(r["main"], r["eta"]) for r in sweep["rows"]] == [
        (NAMES[0], 0.0), (NAMES[0], 0.15), (NAMES[1], 0.0), (NAMES[1], 0.15)
    ]  # fmt: skip
    assert all(r["total"] == 4 for r in sweep["rows"])
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "sweep.md").exists()
