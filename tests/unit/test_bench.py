"""`deepen bench` on the tiny members: every section, consistent figures, clear errors."""

from __future__ import annotations

import json
import statistics

import pytest

from deepen_engine.commands.bench.timing import kv_cache_mb, timed_decode
from deepen_engine.commands.cli import main
from tests.conftest import member_args

SMALL = [
    "--new-tokens", "4", "--batch-sizes", "1", "2", "--long-tokens", "20",
    "--fidelity-prompts", "2", "--fidelity-tokens", "3",
]  # fmt: skip


def test_bench_json_holds_every_section(tiny_folders, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    assert main(["bench", *member_args(tiny_folders), *SMALL, "--json", "--plot", str(plot)]) == 0
    figures = json.loads(capsys.readouterr().out)
    names = figures["members"]
    assert len(names) == 2 and figures["main"] == names[0]

    cold = figures["speed"]["cold_run"]
    assert cold["batch_size"] == 2
    warm = next(r for r in figures["speed"]["rows"] if r["batch_size"] == 2)
    assert cold["cold_over_warm"] == pytest.approx(
        cold["ensemble_ms"] / warm["ensemble_ms"], rel=0.01
    )
    assert cold["rows_computed"] + cold["rows_from_disk"] > 0
    rows = figures["speed"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["members_alone_ms"]) == set(names)
        assert r["sum_of_members_ms"] == pytest.approx(
            sum(r["members_alone_ms"].values()), abs=0.02
        )
        assert r["ratio_ensemble_to_sum"] == pytest.approx(
            r["ensemble_ms"] / r["sum_of_members_ms"], rel=0.01
        )
        assert 0 < r["fusion_only_share"] < 1
        # fusion itself (`Fuser.fuse`) is part of what the steps spend outside forwards
        assert 0 < r["fuse_share"] <= r["fusion_only_share"]
        assert 0 < r["fuse_ms"] <= r["fusion_only_ms"]
        assert r["ensemble_tokens_per_second"] > 0

    length = figures["length"]
    assert [p["new_tokens"] for p in length["curve"]] == [16, 20]
    assert set(length["speedup_over_reencode"]) == {"20"}
    # the baseline re-encodes instead of syncing, and must choose the very same tokens
    assert length["baseline_same_tokens_as_ensemble"] is True

    memory = figures["memory"]
    assert memory["peak_rss_mb"] >= memory["rss_before_load_mb"]
    assert memory["largest_run"]["batch_size"] in (1, 2)
    assert set(memory["kv_cache_mb_largest_run"]) == set(names)
    assert set(memory["weights_mb"]) == set(names)

    fidelity = figures["fidelity"]
    assert fidelity["prompts"] == 2 and 2 <= fidelity["steps"] <= 6
    share = fidelity["agreeing_steps"] / fidelity["steps"]
    assert fidelity["agreement"] == pytest.approx(share, abs=1e-4)  # rounded to 4 places
    assert all(0 <= m <= 1e-4 for m in fidelity["max_leftout_mass"].values())
    for name in names:
        fast = fidelity["fast_path_leftout_mass"][name]
        assert 0 <= fast["mean"] <= fast["max"] < 1
    assert set(figures["section_seconds"]) == {"speed", "length", "fidelity"}
    assert figures["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table_output(tiny_folders, capsys):
    assert main(["bench", *member_args(tiny_folders), *SMALL, "--fidelity-prompts", "0"]) == 0
    out = capsys.readouterr().out
    assert "ms per decoding step" in out and "speed-up over re-encoding" in out
    assert "fidelity:" not in out  # skipped with 0 prompts


def test_fidelity_is_total_when_the_fast_path_keeps_every_token(tiny_ensemble):
    from deepen_engine.commands.bench.sections import fidelity

    biggest = max(len(m.vocab) for m in tiny_ensemble.members)
    full = tiny_ensemble.with_fusion(top_k=biggest, top_mass=1.0, candidates=biggest)
    result = fidelity(full, ["The capital of France is", "def add(a, b):"], 4, 0.0, lambda: None)
    assert result["steps"] >= 2
    assert result["agreement"] == 1.0 and result["disagreements"] == []
    assert all(m["max"] < 1e-6 for m in result["fast_path_leftout_mass"].values())
    margins = result["closest_reference_margins"]
    assert len(margins) == min(5, result["steps"]) and margins == sorted(margins)
    assert all(m >= 0 for m in margins)


def test_fidelity_reports_how_far_apart_disagreeing_tokens_are(tiny_ensemble):
    from deepen_engine.commands.bench.sections import fidelity

    # one candidate: the search can only lift the main member's own top token
    narrow = tiny_ensemble.with_fusion(candidates=1)
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    result = fidelity(narrow, prompts, 8, 0.0, lambda: None)
    assert result["steps"] == 24 and result["agreeing_steps"] < 24
    gaps = [d["reference_gap"] for d in result["disagreements"]]
    assert len(gaps) == 24 - result["agreeing_steps"]
    assert all(g >= 0 for g in gaps) and max(gaps) > 0
    assert len(result["closest_reference_margins"]) == 5


def test_timed_decode_matches_generate_with_both_helper_modes(tiny_ensemble):
    prompt = "Q: What is 12 + 7?\nA:"
    expected = tiny_ensemble.generate(prompt, max_new_tokens=12, min_new_tokens=12).token_ids
    for reencode in (False, True):
        ids, times = timed_decode(tiny_ensemble, prompt, 12, reencode=reencode, min_new_tokens=12)
        assert ids == expected
        assert len(times) == 12 and times == sorted(times)


def test_timed_decode_resumes_after_given_ids(tiny_ensemble):
    prompt = "The capital of France is"
    full = tiny_ensemble.generate(prompt, max_new_tokens=14, min_new_tokens=14).token_ids
    for reencode in (False, True):
        ids, times = timed_decode(
            tiny_ensemble, prompt, 9, reencode=reencode, min_new_tokens=14, resume=full[:5]
        )
        assert ids == full[5:14]
        assert len(times) == 9


def test_kv_cache_size_from_the_model_config(tiny_ensemble):
    member = tiny_ensemble.members[0]
    cfg = member.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert kv_cache_mb(member, 3, 10) == per_position * 30 / 2**20


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0."),
        (["--batch-sizes", "2", "0"], "--batch-sizes must all be >= 1, got [2, 0]."),
        (["--fidelity-prompts", "99"], "--fidelity-prompts must be from 0 to 8, got 99."),
        (["--leftout-mass", "1"], "--leftout-mass must be in [0, 1), got 1.0."),
    ],
)
def test_bench_bad_flags(tiny_folders, capsys, flags, message):
    assert main(["bench", *member_args(tiny_folders), *flags]) == 2
    assert message in capsys.readouterr().err


def test_bench_constraint_section(tiny_folders, capsys):
    pytest.importorskip("llguidance")
    flags = ["--constraint-only", "--new-tokens", "6", "--constraint-repeats", "2", "--json"]
    assert main(["bench", *member_args(tiny_folders), *flags]) == 0
    figures = json.loads(capsys.readouterr().out)
    rows = figures["constraint"]["rows"]
    assert [r["main"] for r in rows] == figures["members"]  # every member as main
    for r in rows:  # the overheads are ratios of the medians (rounded to 0.1 ms here)
        for kind in ("json_schema", "any_text"):
            ratio = r[f"{kind}_ms_per_token"] / r["free_ms_per_token"] - 1
            assert abs(r[f"overhead_{kind}"] - ratio) < 0.1
        # random weights pick special tokens the any-text grammar refuses: no same tokens here
        assert isinstance(r["same_tokens"], bool)
        kinds = {"json_schema", "free", "any_text"}
        assert set(r["helper_positions_per_token"]) == set(r["fusion_ms_per_token"]) == kinds
        assert all(v > 0 for v in r["forward_ms_per_token"].values())
        assert r["mask_ms_per_token"] > 0 and r["runs_each"] == 2
    one = ["--constraint-only", "--new-tokens", "4", "--constraint-repeats", "1"]
    assert main(["bench", *member_args(tiny_folders), *one, "--constraint-mains", "1"]) == 0
    table = capsys.readouterr().out
    assert "any text" in table and "+json" in table
    assert main(["bench", *member_args(tiny_folders), *one, "--constraint-mains", "5"]) == 2
    assert "--constraint-mains [5] out of range" in capsys.readouterr().err


def test_bench_serving_runs_both_modes_on_one_workload(tiny_folders, capsys):
    flags = ["--serving", "--concurrency", "1", "3", "--serving-tokens", "2", "5",
             "--arrival-rate", "50", "--seed", "1", "--repeat", "2", "--json"]  # fmt: skip
    assert main(["bench", *member_args(tiny_folders), *flags]) == 0
    figures = json.loads(capsys.readouterr().out)
    serving = figures["serving"]
    assert [r["concurrency"] for r in serving["rows"]] == [1, 3]
    for row in serving["rows"]:
        batched, serial = row["batched"], row["one_at_a_time"]
        assert batched["completed"] == serial["completed"] == row["concurrency"]  # none lost
        assert batched["output_tokens"] == serial["output_tokens"]  # the same workload
        assert 2 * row["concurrency"] <= batched["output_tokens"] <= 5 * row["concurrency"]
        assert row["speedup_tokens_per_second"] == pytest.approx(
            statistics.median(row["speedups"]), abs=0.01
        )
        assert batched["ttft_ms_p50"] <= batched["ttft_ms_p95"]
        assert len(row["speedups"]) == 2  # --repeat 2: both runs twice, interleaved


def test_serving_workload_is_fixed_by_the_seed():
    from deepen_engine.commands.bench.serving import workload

    first = workload(20, (8, 24), 4.0, seed=3)
    assert first == workload(20, (8, 24), 4.0, seed=3)
    assert first != workload(20, (8, 24), 4.0, seed=4)
    assert [j.arrival for j in first] == sorted(j.arrival for j in first)
    assert all(8 <= j.tokens <= 24 for j in first)


def test_bench_gate_check(tiny_folders, capsys):
    flags = [*SMALL, "--fidelity-prompts", "0", "--gate-check", "--gate-tokens", "3", "--json"]
    assert main(["bench", *member_args(tiny_folders), *flags]) == 0
    gate = json.loads(capsys.readouterr().out)["gate"]
    assert gate["prompts"] == 8 and gate["new_tokens"] == 3
    runs = {(g["method"], g["gate"]): g for g in gate["runs"]}
    assert len(runs) == 9
    for method in ("deepen", "union", "unite"):
        off = runs[(method, "off")]
        assert off["gated_share"] == 0.0 and off["rows_same_tokens_as_off"] == off["rows"] == 8
        assert off["row_steps"] == 8 * 3  # every row asks for fusion at every step
        for g in ("agree", "confident"):
            assert 0.0 <= runs[(method, g)]["gated_share"] <= 1.0
