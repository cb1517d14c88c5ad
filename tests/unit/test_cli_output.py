"""What `deepen` prints besides its results: progress bars on stderr when wanted, and no
other library's bars or warnings unless `--verbose`.
"""

from __future__ import annotations

import argparse
import json

import pytest
from transformers.utils import logging as transformers_logging

from deepen_engine import MemberSpec, load_member
from deepen_engine.commands import progress
from deepen_engine.commands.cli import main
from deepen_engine.members.quiet import quiet_loading
from tests.conftest import member_args


def _args(**kwargs) -> argparse.Namespace:
    base = {"progress": None, "json": False, "prompts_file": None}
    return argparse.Namespace(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("stderr_tty", "stdout_tty", "flags", "shown"),
    [
        (True, True, {}, True),
        (True, False, {}, True),  # plain text to a file: the bar stays on the terminal
        (True, True, {"json": True}, True),
        (True, False, {"json": True}, False),  # JSON to a pipe: quiet unless asked
        (True, False, {"prompts_file": "p.jsonl"}, False),
        (True, False, {"json": True, "progress": True}, True),
        (False, True, {}, False),  # stderr is a file
        (False, False, {"progress": True}, True),
        (True, True, {"progress": False}, False),
    ],
)
def test_when_progress_is_shown(monkeypatch, stderr_tty, stdout_tty, flags, shown):
    monkeypatch.setattr("sys.stderr.isatty", lambda: stderr_tty)
    monkeypatch.setattr("sys.stdout.isatty", lambda: stdout_tty)
    assert progress.wanted(_args(**flags)) is shown


def test_progress_bars_go_to_stderr(tiny_folders, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)  # show bars at once (the tiny run is quick)
    prompt = "The capital of France is Paris. " * 4
    flags = ["--json", "--max-new-tokens", "5", "--prefill-chunk", "4", *member_args(tiny_folders)]
    assert main(["generate", prompt, "--progress", *flags]) == 0
    out, err = capsys.readouterr()
    assert "Reading the prompts" in err and "Generating" in err
    with_bars = json.loads(out)
    assert main(["generate", prompt, "--no-progress", *flags]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert json.loads(out)["text"] == with_bars["text"]


def test_plain_text_has_no_generation_bar(tiny_folders, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)
    flags = ["--max-new-tokens", "5", "--progress", *member_args(tiny_folders)]
    assert main(["generate", "Q:", *flags]) == 0
    err = capsys.readouterr().err
    assert "Reading the prompts" in err and "Generating" not in err


def test_loading_hides_other_libraries_bars(tiny_folders, capsys, monkeypatch):
    monkeypatch.delenv("DEEPEN_VERBOSE", raising=False)
    load_member(MemberSpec(source=tiny_folders[0]))
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # restored afterwards
    monkeypatch.setenv("DEEPEN_VERBOSE", "1")
    load_member(MemberSpec(source=tiny_folders[0]))
    assert "Loading weights" in capsys.readouterr().err


def test_quiet_loading_restores_a_disabled_switch():
    transformers_logging.disable_progress_bar()
    try:
        with quiet_loading():
            pass
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
