"""`deepen serve` gives the memory malloc holds free back to the system (server/memory.py)."""

from __future__ import annotations

import threading
import time

from deepen_engine.commands.cli import build_parser, main
from deepen_engine.commands.serve import MALLOC_TRIM_INTERVAL
from deepen_engine.server import create_app, memory, runner
from deepen_engine.server.memory import MallocTrimmer


def test_the_trimmer_trims_every_interval_until_stopped():
    calls: list[float] = []
    trimmer = MallocTrimmer(0.02, trim=lambda: calls.append(time.monotonic()))
    assert trimmer.start()
    time.sleep(0.3)
    trimmer.stop()
    made = len(calls)
    time.sleep(0.1)
    assert made >= 3 and len(calls) == made == trimmer.trims
    assert not any(t.name == "deepen-malloc-trim" for t in threading.enumerate())


def test_no_trimmer_at_interval_zero_or_without_malloc_trim():
    assert not MallocTrimmer(0, trim=lambda: None).start()
    trimmer = MallocTrimmer(1.0, trim=lambda: None)
    trimmer._trim = None  # a C library without malloc_trim (macOS, musl)
    assert not trimmer.start()
    trimmer.stop()  # nothing started: nothing to wait for


def test_serve_trims_while_it_serves(tiny_ensemble, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory, "glibc_malloc_trim", lambda: lambda: calls.append(1))
    monkeypatch.setattr(runner.DrainingServer, "run", lambda self: time.sleep(0.4))
    app = create_app(tiny_ensemble)
    runner.serve(app, "127.0.0.1", 0, shutdown_timeout=1, malloc_trim_interval=0.05)
    assert len(calls) >= 3
    assert not any(t.name == "deepen-malloc-trim" for t in threading.enumerate())


def test_the_command_line_sets_the_interval():
    parser = build_parser()
    assert parser.parse_args(["serve"]).malloc_trim_interval == MALLOC_TRIM_INTERVAL
    assert MALLOC_TRIM_INTERVAL == memory.MALLOC_TRIM_INTERVAL
    assert parser.parse_args(["serve", "--malloc-trim-interval", "0"]).malloc_trim_interval == 0


def test_serve_refuses_a_negative_interval_before_loading(capsys):
    assert main(["serve", "--malloc-trim-interval", "-1"]) == 2
    assert "--malloc-trim-interval must be >= 0 seconds, got -1.0." in capsys.readouterr().err
