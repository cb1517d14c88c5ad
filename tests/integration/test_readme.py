"""Every python and bash snippet of README.md runs as written, on the default members.

A snippet is skipped only when the line before its fence says why:
`<!-- readme-test: skip: <reason> -->` (e.g. it installs packages, or reruns the suite).
Each snippet runs from the repository root, as a reader would paste it, with this checkout
first on PYTHONPATH. Python snippets and bash snippets made only of `deepen` command lines
run in one process with the cookbook scripts (tests/integration/one_process.py, fixture
`one_process`), so the default members load once for all of them; any other bash snippet
runs in its own shell with the environment's `deepen` on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


@dataclass
class Snippet:
    """One fenced block of the README."""

    language: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # the reason, if the README says not to run it


def snippets() -> list[Snippet]:
    """The README's python and bash blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        language, code = match[1], match[2]
        if language not in ("python", "bash"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Snippet(language, code, line, skip[1] if skip else None))
    return found


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"  # as `make` sets it
    return env


def test_the_readme_has_snippets_that_run():
    found = snippets()
    assert sum(s.skip is None and s.language == "python" for s in found) >= 3
    assert sum(s.skip is None and s.language == "bash" for s in found) >= 1
    assert (Path(sys.executable).parent / "deepen").exists(), "install deepen in this env"


@pytest.mark.parametrize("snippet", snippets(), ids=lambda s: f"{s.language}-line{s.line}")
def test_snippet_runs_as_written(snippet: Snippet, request):
    if snippet.skip is not None:
        pytest.skip(snippet.skip)
    from tests.integration.conftest import cli_lines

    if snippet.language == "python" or cli_lines(snippet.code) is not None:
        runs = request.getfixturevalue("one_process")
        keys = (
            [f"readme:{snippet.line}"]
            if snippet.language == "python"
            else [f"readme:{snippet.line}:{k}" for k in range(len(cli_lines(snippet.code) or []))]
        )
        for key in keys:
            run = runs[key]
            assert run.rc == 0, f"README line {snippet.line} ({key}) failed:\n{run.stderr[-3000:]}"
            assert run.stdout.strip(), f"README line {snippet.line} ({key}) printed nothing"
            assert "Traceback" not in run.stderr
            assert "Loading weights" not in run.stderr  # no library's loading bar (issue 24)
        return
    command = (
        [sys.executable, "-c", snippet.code]
        if snippet.language == "python"
        else ["bash", "-euo", "pipefail", "-c", snippet.code]
    )
    done = subprocess.run(
        command, cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"README line {snippet.line} failed:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"README line {snippet.line} printed nothing"
    assert "Traceback" not in done.stderr
