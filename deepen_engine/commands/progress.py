"""Progress bars on stderr for `deepen generate`: one while the members read the prompts,
one while tokens are chosen, each shown only once its step has lasted `DELAY` seconds.

Shown by default when stderr is a terminal, except for JSON output to a pipe or file
(`--json` or `--prompts-file` with stdout redirected); `--progress` / `--no-progress`
decide instead. A single prompt printed as plain text needs no generation bar: its text
is the progress.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from tqdm.auto import tqdm

from ..members import display_name
from ..outputs import Progress

DELAY = 1.0
"""Seconds a step runs before its bar appears (short steps print nothing)."""


def announce_loading(specs: list[Any]) -> list[Any]:
    """Say on stderr that the members are loading (a later load prints nothing else for
    tens of seconds), as `deepen serve` does; the specs, unchanged.
    """
    names = ", ".join(display_name(s) for s in specs)
    print(f"deepen: loading members {names} ...", file=sys.stderr, flush=True)
    return specs


def wanted(args: argparse.Namespace) -> bool:
    """Whether to show progress: `--progress`/`--no-progress`, else the rule above."""
    if args.progress is not None:
        return bool(args.progress)
    machine_output = args.json or args.prompts_file is not None
    return sys.stderr.isatty() and (sys.stdout.isatty() or not machine_output)


class Bars:
    """Turns the engine's `Progress` reports into at most one bar at a time."""

    def __init__(self, generation: bool = True) -> None:
        self.generation = generation  # False: the prefill bar only
        self.bar: Any = None  # the open tqdm bar, if any
        self.stage = ""
        self.read: dict[str, tuple[int, int]] = {}  # member -> (done, total) of the prefill

    def __call__(self, progress: Progress) -> None:
        """Update the bar of the report's stage (opening it, or closing the last one)."""
        if progress.stage != self.stage:
            self.close()
            self.stage = progress.stage
            self.read = {}
            if progress.stage == "generate" and not self.generation:
                return
            desc = "Reading the prompts" if progress.stage == "prefill" else "Generating"
            self.bar = tqdm(desc=desc, unit="tok", file=sys.stderr, delay=DELAY, leave=False)
        if self.bar is None:
            return
        if progress.stage == "prefill":
            self.read[progress.member or ""] = (progress.done, progress.total)
            done = sum(d for d, _ in self.read.values())
            total = sum(t for _, t in self.read.values())
            self.bar.set_postfix_str(progress.member or "", refresh=False)
        else:
            done, total = progress.done, progress.total
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Close the open bar (it leaves no line behind)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @contextmanager
    def printing(self) -> Iterator[None]:
        """Print results without tearing the bar (it is cleared and redrawn)."""
        with tqdm.external_write_mode(file=sys.stderr) if self.bar is not None else nullcontext():
            yield
