"""`deepen demo` on the tiny members: it prints what each member alone and the ensemble
answer, computed by the run (checked against the same calls made here).
"""

from __future__ import annotations

import pytest

from deepen_engine import Ensemble, MemberSpec
from deepen_engine.commands import demo
from deepen_engine.commands.cli import main
from deepen_engine.commands.eval.task import extract_answer, is_correct
from deepen_engine.commands.eval.tasks import CAPITALS
from tests.conftest import member_args


@pytest.fixture(scope="module")
def reference(tiny_folders):
    return Ensemble([MemberSpec(source=p) for p in tiny_folders], min_anchors=50)


def _systems(ens: Ensemble) -> list[Ensemble]:
    return [ens.with_fusion(main=i, eta=0) for i in range(len(ens.members))] + [ens]


def test_demo_questions_table(tiny_folders, reference, capsys):
    assert main(["demo", *member_args(tiny_folders)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    names = [m.name for m in reference.members]
    assert lines[0] == (
        f"fused = DeePEn ensemble of {names[0]} + {names[1]} "
        "(main auto, prompt weights, eta 0.15, 5 steps)"
    )
    shots, questions = demo._questions()
    assert [q.subject for q in questions] == list(demo.COUNTRIES)
    prompts = [CAPITALS.prompt(shots, q) for q in questions]
    expected = [
        [r.text for r in view.generate(prompts, max_new_tokens=12, stop=["\n"])]
        for view in _systems(reference)
    ]
    for q, outputs in zip(questions, zip(*expected)):
        row = next(line for line in lines if line.startswith(q.subject + "  "))
        for text in outputs:
            mark = "+" if is_correct(text, q.answers) else "-"
            assert f"{mark} {demo.shown(extract_answer(text)) or '(none)'}" in row
    totals = next(line for line in lines if line.startswith("right "))
    counts = [sum(is_correct(t, q.answers) for t, q in zip(a, questions)) for a in expected]
    assert totals.split()[1:] == [f"{c}/{len(questions)}" for c in counts]


def test_demo_with_a_prompt(tiny_folders, reference, capsys):
    assert main(["demo", "Q: 12 + 7?\\nA:", "--max-new-tokens", "6",
                 *member_args(tiny_folders)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "prompt: 'Q: 12 + 7?\\nA:'" in out  # the escape became a newline
    rows = [line for line in out.splitlines() if " | " in line]
    labels = [m.name for m in reference.members] + ["fused"]
    assert [row.split(" | ")[0].rstrip() for row in rows] == labels
    for row, view in zip(rows, _systems(reference)):
        text = view.generate("Q: 12 + 7?\nA:", max_new_tokens=6).text
        assert row.split(" | ", 1)[1] == repr(text.strip())


def test_shown_answers_fit_a_line():
    assert demo.shown("Madrid") == "Madrid"
    assert demo.shown("a\x1cb\tc") == "a\\x1cb\\tc"
    assert demo.shown("x" * 40) == "x" * 25 + "..."


def test_demo_checks_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(demo, "Ensemble", lambda *a, **k: pytest.fail("members were loaded"))
    assert main(["demo", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1, got 0." in capsys.readouterr().err
