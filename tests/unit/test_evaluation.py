"""Capital-city QA scoring: normalisation, interval, adaptive weights, split, and a run of
`deepen eval` on tiny members."""

from __future__ import annotations

import json

import pytest

from deepen_engine import ConfigError
from deepen_engine.commands.cli import main
from deepen_engine.commands.eval_task import (
    Question,
    adaptive_weights,
    build_prompt,
    is_correct,
    load_questions,
    normalise,
    split_questions,
    wilson_interval,
)
from tests.conftest import member_args


def test_normalise_and_match():
    assert normalise("Bogotá") == normalise("BOGOTA") == "bogota"
    assert normalise("  Washington, D.C. ") == "washington d c"
    assert normalise("Nuku'alofa") == "nuku alofa"
    assert is_correct(" Paris\nQ: What is", "Paris")
    assert is_correct(" paris.", "Paris")
    assert not is_correct(" Paris is the capital", "Paris")
    assert not is_correct("", "Paris")
    assert not is_correct(" ...", "...")  # nothing left after normalisation is never right
    assert is_correct(" Sucre", ["La Paz", "Sucre"])  # any listed spelling counts


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson_interval(0, 10)
    assert (round(low, 4), round(high, 4)) == (0.0, 0.2775)
    low, high = wilson_interval(10, 10)
    assert (round(low, 4), round(high, 4)) == (0.7225, 1.0)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_adaptive_weights_formula():
    assert adaptive_weights([0.5, 0.25]) == pytest.approx([2 / 3, 1 / 3])
    assert adaptive_weights([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)


def test_split_is_seeded_and_disjoint():
    questions = [Question(f"C{i}", (f"K{i}",)) for i in range(40)]
    a = split_questions(questions, seed=3, shots=4, dev_size=10)
    b = split_questions(questions, seed=3, shots=4, dev_size=10)
    c = split_questions(questions, seed=4, shots=4, dev_size=10)
    assert (a.shots, a.dev, a.test) == (b.shots, b.dev, b.test)
    assert a.test != c.test
    assert (len(a.shots), len(a.dev), len(a.test)) == (4, 10, 26)
    assert len({q.country for q in a.shots + a.dev + a.test}) == 40
    with pytest.raises(ConfigError, match="leaves no test questions"):
        split_questions(questions, seed=0, shots=20, dev_size=20)


def test_prompt_text():
    shots = [Question("France", ("Paris",)), Question("Japan", ("Tokyo",))]
    assert build_prompt(shots, Question("Peru", ("Lima",))) == (
        "Q: What is the capital of France?\nA: Paris\n\n"
        "Q: What is the capital of Japan?\nA: Tokyo\n\n"
        "Q: What is the capital of Peru?\nA:"
    )


def test_questions_come_from_countryinfo():
    questions = load_questions()
    assert len(questions) > 200
    assert Question("France", ("Paris",)) in questions
    assert all(q.answers and all(isinstance(a, str) for a in q.answers) for q in questions)
    assert [q.country for q in questions] == sorted(q.country for q in questions)


def test_eval_command_on_tiny_members(tiny_folders, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["--n", "6", "--dev-size", "5", "--weights", "adaptive", "--batch-size", "4"]
    code = main(["eval", *member_args(tiny_folders), *args, "--json", "--output", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert summary["members"] == names
    assert summary["weight_mode"] == "adaptive"
    assert sum(summary["weights"]) == pytest.approx(1.0, abs=1e-3)
    assert [r["system"] for r in summary["results"]] == [*names, f"ensemble (main {names[0]})"]
    assert all(r["total"] == 6 for r in summary["results"])
    assert [d["total"] for d in summary["dev"]] == [5, 5]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 5 + 3 * 6
    assert {"system", "country", "answers", "output", "correct"} <= set(records[0])
    by_system = {}
    for r in records:
        by_system.setdefault(r["system"], []).append(r["correct"])
    for r in summary["results"]:
        assert sum(by_system[r["system"]]) == r["correct"]


def test_eval_rejects_bad_weights(tiny_folders, capsys):
    assert main(["eval", *member_args(tiny_folders), "--weights", "heavy"]) == 2
    assert "--weights takes numbers" in capsys.readouterr().err


def test_any_listed_spelling_scores(tiny_folders):
    from deepen_engine.commands.eval_task import score

    questions = [Question("Bolivia", ("Sucre", "La Paz")), Question("France", ("Paris",))]
    result = score("fake", lambda prompts: [" La Paz", " Lyon"], [], questions)
    assert (result.correct, result.total) == (1, 2)
    assert [r["correct"] for r in result.records] == [True, False]


def test_sweep_on_tiny_members(tiny_folders, tmp_path, capsys):
    prefix = tmp_path / "sweep"
    out = tmp_path / "answers.jsonl"
    args = ["--dev-size", "4", "--batch-size", "4", "--sweep-eta", "0", "0.5", "2.0"]
    args += ["--sweep-steps", "5", "--sweep-main", "0", "1", "--sweep-output", str(prefix)]
    code = main(["eval", *member_args(tiny_folders), *args, "--json", "--output", str(out)])
    assert code == 0
    sweep = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert sweep["dev_questions"] == 4
    assert [(r["main"], r["steps"], r["eta"]) for r in sweep["rows"]] == [
        (names[0], 5, 0.0), (names[0], 5, 0.5), (names[0], 5, 2.0),
        (names[1], 5, 0.0), (names[1], 5, 0.5), (names[1], 5, 2.0),
    ]  # fmt: skip
    alone = {m["system"]: m["accuracy"] for m in sweep["members_alone"]}
    # eta 0 is the main member alone
    assert sweep["rows"][0]["accuracy"] == alone[names[0]]
    assert sweep["rows"][3]["accuracy"] == alone[names[1]]
    assert sweep["best"]["accuracy"] == max(r["accuracy"] for r in sweep["rows"])
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["rows"] == sweep["rows"]
    table = (tmp_path / "sweep.md").read_text()
    assert f"| eta | main {names[0]}, 5 steps | main {names[1]}, 5 steps |" in table
    assert table.count("\n| ") == 4  # header + 3 etas
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 4 + 4 * 4  # members alone + 4 fused runs, 4 questions each


def test_sweep_rejects_bad_values(tiny_folders, capsys):
    base = ["eval", *member_args(tiny_folders), "--sweep-eta", "0.1"]
    assert main([*base, "--sweep-main", "2"]) == 2
    assert "--sweep-main [2] out of range for 2 members; give 0 to 1." in capsys.readouterr().err
    assert main(["eval", *member_args(tiny_folders), "--sweep-eta", "-1"]) == 2
    assert "--sweep-eta values must be >= 0, got [-1.0]." in capsys.readouterr().err
