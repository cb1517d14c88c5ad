"""`deepen eval`: the tasks (capitals, countries, arithmetic, demonyms), scoring, intervals,
the paired test, the oracle, adaptive weights, the split, and runs of the command on tiny
members."""

from __future__ import annotations

import json

import pytest

from deepen_engine import ConfigError, Ensemble, MemberSpec
from deepen_engine.commands.cli import main
from deepen_engine.commands.eval.stats import mcnemar, oracle
from deepen_engine.commands.eval.task import (
    Question,
    Score,
    adaptive_weights,
    is_correct,
    normalise,
    split_questions,
    wilson_interval,
)
from deepen_engine.commands.eval.tasks import (
    ARITHMETIC,
    CAPITALS,
    COUNTRIES,
    DEMONYMS,
    first_integer_matches,
    load_arithmetic,
    load_capitals,
    load_countries,
    load_demonyms,
    tasks_named,
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
    assert len({q.subject for q in a.shots + a.dev + a.test}) == 40
    with pytest.raises(ConfigError, match="leaves no test questions"):
        split_questions(questions, seed=0, shots=20, dev_size=20)


def test_prompt_text():
    shots = [Question("France", ("Paris",)), Question("Japan", ("Tokyo",))]
    assert CAPITALS.prompt(shots, Question("Peru", ("Lima",))) == (
        "Q: What is the capital of France?\nA: Paris\n\n"
        "Q: What is the capital of Japan?\nA: Tokyo\n\n"
        "Q: What is the capital of Peru?\nA:"
    )


def test_questions_come_from_countryinfo():
    questions = load_capitals()
    assert len(questions) > 200
    assert Question("France", ("Paris",)) in questions
    assert all(q.answers and all(isinstance(a, str) for a in q.answers) for q in questions)
    assert [q.subject for q in questions] == sorted(q.subject for q in questions)


def test_countries_task():
    questions = load_countries()
    assert len(questions) > 200
    by_capital = {q.subject: q for q in questions}
    assert by_capital["Paris"].answers[:2] == ("France", "French Republic")
    assert "FR" not in by_capital["Paris"].answers  # codes of two letters do not count
    assert "Kingston" not in by_capital  # the capital of more than one country
    assert COUNTRIES.prompt([by_capital["Lima"]], by_capital["Paris"]) == (
        "Q: Which country has the capital Lima?\nA: Peru\n\n"
        "Q: Which country has the capital Paris?\nA:"
    )
    assert COUNTRIES.check(" French Republic", by_capital["Paris"].answers)
    assert not COUNTRIES.check(" Belgium", by_capital["Paris"].answers)


def test_arithmetic_task_is_fixed_and_right():
    questions = load_arithmetic()
    assert questions == load_arithmetic() and len(questions) == 400
    assert len({q.subject for q in questions}) == 400
    for q in questions:
        a, b = (int(x) for x in q.subject.split(" + "))
        assert 1 <= a <= 20 and 1 <= b <= 20 and q.answers == (str(a + b),)
    assert ARITHMETIC.prompt([], questions[0]) == f"Q: What is {questions[0].subject}?\nA:"
    assert first_integer_matches(" 85\nQ: What", ("85",))
    assert first_integer_matches(" 85.", ("85",))
    assert not first_integer_matches(" 58", ("85",))
    assert not first_integer_matches(" eighty", ("85",))


def test_demonyms_task():
    questions = load_demonyms()
    assert questions == load_demonyms()  # the same questions, in the same order, every time
    assert len(questions) == 239
    assert [q.subject for q in questions] == sorted(q.subject for q in questions)
    by_country = {q.subject: q for q in questions}
    assert by_country["France"].answers == ("French",)
    assert by_country["The Bahamas"].answers == ("Bahamian",)
    assert "Serbia and Montenegro" not in by_country  # `Serbian/Montenegrin`: left out
    assert all(len(q.answers) == 1 and "/" not in q.answer for q in questions)
    assert DEMONYMS.prompt([by_country["France"]], by_country["The Bahamas"]) == (
        "Q: What is a person from France called?\nA: French\n\n"
        "Q: What is a person from The Bahamas called?\nA:"
    )
    # exact match after normalisation: case, accents, punctuation, the first line only
    assert DEMONYMS.check(" bahamian.\nQ: What", by_country["The Bahamas"].answers)
    assert DEMONYMS.check(" Sao Toméan", ("Sao Tomean",))
    assert not DEMONYMS.check(" Bahamas", by_country["The Bahamas"].answers)
    assert not DEMONYMS.check(" Bahamian people", by_country["The Bahamas"].answers)
    # the seed-0 split: 4 shots, 50 dev, the other 185 for test; disjoint, seeded
    split = split_questions(questions, 0)
    assert (len(split.shots), len(split.dev), len(split.test)) == (4, 50, 185)
    assert split == split_questions(load_demonyms(), 0)
    assert len({q.subject for q in split.shots + split.dev + split.test}) == 239


def test_oracle_counts_questions_any_member_answers():
    def scored(name: str, marks: list[bool]) -> Score:
        records = [{"correct": m} for m in marks]
        return Score(system=name, correct=sum(marks), total=len(marks), records=records)

    a = scored("a", [True, False, False, True])
    b = scored("b", [False, True, False, True])
    best = oracle([a, b])
    assert (best.correct, best.total, best.accuracy) == (3, 4, 0.75)
    assert oracle([a]).correct == 2
    with pytest.raises(ValueError, match="same questions"):
        oracle([a, scored("c", [True])])


def test_tasks_by_name():
    assert tasks_named(None) == [CAPITALS]
    assert [t.name for t in tasks_named(["all"])] == [
        "capitals",
        "countries",
        "arithmetic",
        "demonyms",
    ]
    assert tasks_named(["demonyms"]) == [DEMONYMS]
    with pytest.raises(ConfigError, match="'trivia' is not a task"):
        tasks_named(["trivia"])


def test_mcnemar_exact_values():
    # 6 gained, 1 lost: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8/128 = 0.125
    system = [True] * 6 + [False] + [True] * 5
    reference = [False] * 6 + [True] + [True] * 5
    test = mcnemar(system, reference)
    assert (test["gained"], test["lost"], test["p_value"]) == (6, 1, 0.125)
    assert test["verdict"] == "same"
    # 10 lost, 0 gained: 2 / 1024
    worse = mcnemar([False] * 10, [True] * 10)
    assert worse["p_value"] == round(2 / 1024, 4) and worse["verdict"] == "worse"
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="differ in number"):
        mcnemar([True], [True, False])


def test_eval_command_on_tiny_members(tiny_folders, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["--n", "6", "--dev-size", "5", "--weights", "adaptive", "--batch-size", "4"]
    code = main(["eval", *member_args(tiny_folders), *args, "--json", "--output", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert summary["members"] == names and summary["methods"] == ["deepen"]
    assert summary["weight_mode"] == "adaptive"
    (task,) = summary["tasks"]
    assert task["task"] == "capitals"
    assert sum(task["weights"]) == pytest.approx(1.0, abs=1e-3)
    # the defaults: each question led by its lowest-bpb member, weights from the prompt
    assert [r["system"] for r in task["results"]] == [*names, "deepen+prompt (main auto)"]
    assert all(r["total"] == 6 for r in task["results"])
    assert [d["total"] for d in task["dev"]] == [5, 5]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 5 + 3 * 6
    assert {"task", "system", "subject", "answers", "output", "correct"} <= set(records[0])
    by_system = {}
    for r in records:
        by_system.setdefault(r["system"], []).append(r["correct"])
    for r in task["results"]:
        assert sum(by_system[r["system"]]) == r["correct"]


def test_eval_every_method_on_every_task(tiny_folders, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["--n", "4", "--dev-size", "2", "--batch-size", "4", "--task", "all"]
    args += ["--method", "all", "--output", str(out)]
    assert main(["eval", *member_args(tiny_folders), *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert [t["task"] for t in summary["tasks"]] == [
        "capitals",
        "countries",
        "arithmetic",
        "demonyms",
    ]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for task in summary["tasks"]:
        systems = [r["system"] for r in task["results"]]
        assert systems == [
            *names,
            *(f"{m}+prompt (main auto)" for m in ("deepen", "union", "unite")),
        ]
        best = max(task["results"][:2], key=lambda r: r["accuracy"])
        assert task["best_member"] == best["system"]
        for comparison in task["comparisons"]:
            fused = next(r for r in task["results"] if r["system"] == comparison["system"])
            assert comparison["minus_best_member"] == pytest.approx(
                fused["accuracy"] - best["accuracy"], abs=1e-4
            )
            mine = [
                r["correct"]
                for r in records
                if r["task"] == task["task"] and r["system"] == comparison["system"]
            ]
            theirs = [
                r["correct"]
                for r in records
                if r["task"] == task["task"] and r["system"] == best["system"]
            ]
            assert comparison["mcnemar_vs_best_member"] == mcnemar(mine, theirs)
    # the table prints every task and system
    assert main(["eval", *member_args(tiny_folders), *args]) == 0
    table = capsys.readouterr().out
    assert "| system | capitals (4) | countries (4) | arithmetic (4) | demonyms (4) |" in table
    assert table.count("\n| unite+prompt (main auto)") == 1


def test_eval_rejects_bad_weights(tiny_folders, capsys):
    assert main(["eval", *member_args(tiny_folders), "--weights", "heavy"]) == 2
    assert "--weights takes numbers" in capsys.readouterr().err


def test_any_listed_spelling_scores():
    from deepen_engine.commands.eval.task import score

    questions = [Question("Bolivia", ("Sucre", "La Paz")), Question("France", ("Paris",))]
    result = score(CAPITALS, "fake", lambda prompts: [" La Paz", " Lyon"], [], questions)
    assert (result.correct, result.total) == (1, 2)
    assert [r["correct"] for r in result.records] == [True, False]


def test_sweep_on_tiny_members(tiny_folders, tmp_path, capsys):
    prefix = tmp_path / "sweep"
    out = tmp_path / "answers.jsonl"
    args = ["--dev-size", "4", "--batch-size", "4", "--sweep-eta", "0", "0.5"]
    args += ["--sweep-method", "deepen", "union", "--task", "capitals", "arithmetic"]
    args += ["--weighting", "fixed"]
    args += ["--sweep-steps", "5", "--sweep-main", "0", "1", "--sweep-output", str(prefix)]
    code = main(["eval", *member_args(tiny_folders), *args, "--json", "--output", str(out)])
    assert code == 0
    sweep = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert sweep["dev_questions"] == {"capitals": 4, "arithmetic": 4}
    settings = [
        ("deepen", names[0], 5, 0.0), ("deepen", names[0], 5, 0.5), ("union", names[0], None, None),
        ("deepen", names[1], 5, 0.0), ("deepen", names[1], 5, 0.5), ("union", names[1], None, None),
    ]  # fmt: skip
    rows = [(r["method"], r["main"], r["steps"], r["eta"]) for r in sweep["rows"]]
    assert rows == settings * 2  # capitals, then arithmetic
    for task in ("capitals", "arithmetic"):
        alone = {m["system"]: m["accuracy"] for m in sweep["members_alone"] if m["task"] == task}
        task_rows = [r for r in sweep["rows"] if r["task"] == task]
        # eta 0 is the main member alone
        assert task_rows[0]["accuracy"] == alone[names[0]]
        assert task_rows[3]["accuracy"] == alone[names[1]]
        assert sweep["best"][task]["accuracy"] == max(r["accuracy"] for r in task_rows)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["rows"] == sweep["rows"]
    table = (tmp_path / "sweep.md").read_text()
    assert "| system | capitals (4) | arithmetic (4) |" in table
    assert f"| union main={names[1]} |" in table
    assert table.count("\n| ") == 1 + 2 + 6  # header, members alone, settings
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * (2 * 4 + 4 * 4)  # per task: members alone + 4 fused runs


def test_sweep_rejects_bad_values(tiny_folders, capsys):
    base = ["eval", *member_args(tiny_folders), "--sweep-eta", "0.1"]
    assert main([*base, "--sweep-main", "2"]) == 2
    err = capsys.readouterr().err
    assert "--sweep-main [2] out of range for 2 members; give 0 to 1 or auto." in err
    assert main(["eval", *member_args(tiny_folders), "--sweep-eta", "-1"]) == 2
    assert "--sweep-eta values must be >= 0, got [-1.0]." in capsys.readouterr().err


def test_eval_and_sweep_with_each_weighting(tiny_folders, tmp_path, capsys):
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    base = ["eval", *member_args(tiny_folders), "--dev-size", "2", "--batch-size", "4"]
    base += ["--method", "union", "--weighting", "fixed", "confidence"]
    base += ["--output", str(tmp_path / "a.jsonl"), "--json"]
    assert main([*base, "--n", "3"]) == 0
    (task,) = json.loads(capsys.readouterr().out)["tasks"]
    systems = [r["system"] for r in task["results"]]
    assert systems == [*names, "union (main auto)", "union+confidence (main auto)"]
    assert [c["weighting"] for c in task["comparisons"]] == ["fixed", "confidence"]
    sweep_args = ["--sweep-method", "unite", "--sweep-output", str(tmp_path / "s")]
    assert main([*base, *sweep_args]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["weighting"]) for r in sweep["rows"]] == [
        ("unite", "fixed"),
        ("unite", "confidence"),
    ]
    assert "| unite+confidence main=auto |" in (tmp_path / "s.md").read_text()


def test_eval_main_dev_leads_with_the_best_member_on_dev(tiny_folders, tmp_path, capsys):
    args = ["--n", "3", "--dev-size", "4", "--batch-size", "4", "--task", "capitals"]
    args += ["--main", "dev", "--method", "union", "--output", str(tmp_path / "a.jsonl")]
    assert main(["eval", *member_args(tiny_folders), *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["main"] == "dev"
    (task,) = summary["tasks"]
    dev = [d["accuracy"] for d in task["dev"]]
    best = summary["members"][dev.index(max(dev))]
    assert task["main"] == best
    assert task["results"][-1]["system"] == f"union+prompt (main {best})"
    with pytest.raises(SystemExit):  # argparse refuses it
        main(["eval", *member_args(tiny_folders), "--main", "first"])
    assert "give a member index, auto or dev, got 'first'" in capsys.readouterr().err


def test_eval_main_auto_is_the_per_prompt_leader(tiny_folders, tmp_path, capsys):
    """`--main auto` in eval is the engine's rule (each question's lowest-bpb member), the
    same answers as `Ensemble.with_fusion(main="auto")`."""
    out = tmp_path / "a.jsonl"
    args = ["--n", "3", "--dev-size", "2", "--batch-size", "4", "--task", "capitals"]
    args += ["--main", "auto", "--weighting", "prompt", "--output", str(out), "--json"]
    assert main(["eval", *member_args(tiny_folders), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    (task,) = summary["tasks"]
    assert summary["main"] == task["main"] == "auto"
    assert task["dev"] == []  # nothing chosen on dev
    label = "deepen+prompt (main auto)"
    assert task["results"][-1]["system"] == label
    records = [json.loads(line) for line in out.read_text().splitlines()]
    fused = [r for r in records if r["system"] == label]
    view = Ensemble(
        [MemberSpec(source=f) for f in tiny_folders],
        main="auto",
        weighting="prompt",
        min_anchors=50,
    )
    split = split_questions(CAPITALS.load(), 0, 4, 2)
    prompts = [CAPITALS.prompt(split.shots, q) for q in split.test[:3]]
    texts = [r.text for r in view.generate(prompts, max_new_tokens=CAPITALS.max_new_tokens,
                                           stop=["\n"], batch_size=4)]  # fmt: skip
    assert [r["output"] for r in fused] == texts


def test_sweep_over_prompt_temperatures_and_auto_leader(tiny_folders, tmp_path, capsys):
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    args = ["--dev-size", "3", "--batch-size", "4", "--task", "capitals", "--json"]
    args += ["--sweep-method", "union", "--sweep-main", "auto", "1", "--weighting", "prompt"]
    args += ["--sweep-weight-temperature", "0.01", "1", "--sweep-output", str(tmp_path / "s")]
    args += ["--output", str(tmp_path / "a.jsonl")]
    assert main(["eval", *member_args(tiny_folders), *args]) == 0
    sweep = json.loads(capsys.readouterr().out)
    rows = [(r["main"], r["weighting"], r["weight_temperature"]) for r in sweep["rows"]]
    assert rows == [
        ("auto", "prompt", 0.01), ("auto", "prompt", 1.0),
        (names[1], "prompt", 0.01), (names[1], "prompt", 1.0),
    ]  # fmt: skip
    table = (tmp_path / "s.md").read_text()
    assert "| union+prompt T=0.01 main=auto |" in table
    assert f"| union+prompt T=1 main={names[1]} |" in table
    bad = ["eval", *member_args(tiny_folders), "--sweep-weight-temperature", "0.1"]
    assert main([*bad, "--weighting", "fixed"]) == 2
    assert "--sweep-weight-temperature needs --weighting prompt." in capsys.readouterr().err
    assert main([*bad, "0", "--weighting", "prompt"]) == 2
    err = capsys.readouterr().err
    assert "--sweep-weight-temperature values must be > 0, got [0.1, 0.0]." in err


def test_eval_writes_into_the_cache_not_the_current_directory(
    tiny_folders, tmp_path, monkeypatch, capsys
):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("DEEPEN_CACHE", str(cache))
    monkeypatch.chdir(work)
    args = ["--n", "2", "--dev-size", "2", "--batch-size", "4", "--json"]
    assert main(["eval", *member_args(tiny_folders), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outputs"] == str(cache / "eval" / "deepen-eval.jsonl")
    assert (cache / "eval" / "deepen-eval.jsonl").read_text().count("\n") > 0
    assert list(work.iterdir()) == []


def test_eval_members_alone_on_dev(tiny_folders, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["--task", "demonyms", "--systems", "members", "--split", "dev", "--dev-size", "5"]
    args += ["--n", "4", "--batch-size", "4", "--output", str(out)]
    assert main(["eval", *member_args(tiny_folders), *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert summary["split"] == "dev" and summary["methods"] == []
    (task,) = summary["tasks"]
    assert [r["system"] for r in task["results"]] == names and task["comparisons"] == []
    records = [json.loads(line) for line in out.read_text().splitlines()]
    dev = split_questions(load_demonyms(), 0, 4, 5).dev[:4]
    assert [r["subject"] for r in records] == [q.subject for q in dev] * 2
    either = [a["correct"] or b["correct"] for a, b in zip(records[:4], records[4:])]
    assert task["oracle"]["correct"] == sum(either) and task["oracle"]["total"] == 4
    assert main(["eval", *member_args(tiny_folders), *args]) == 0
    assert "| oracle (any member right) |" in capsys.readouterr().out


def test_eval_dev_split_refuses_choosing_on_dev(tiny_folders, capsys):
    args = ["--split", "dev", "--weights", "adaptive"]
    assert main(["eval", *member_args(tiny_folders), *args]) == 2
    assert "--split dev answers the dev questions" in capsys.readouterr().err
