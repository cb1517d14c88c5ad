"""Run several Python scripts, and `deepen` command lines, in ONE process, each with its own
globals, stdin, stdout and stderr, so the default members load once for all of them.

The integration tier runs the README's snippets and the cookbook scripts through it: each
of them would otherwise start a process and load the members again (about 30-60 s each on
2 CPU cores). Each script still runs as written (`runpy.run_path(..., run_name="__main__")`);
only `load_local_member` is shared: a second load of the same `MemberSpec` returns the
member already loaded (the model, tokenizer and canonical vocabulary; every `Ensemble` keeps
its own caches and batch state).

    python -m tests.integration.one_process OUT_DIR ITEM ...

An ITEM is `py:PATH` (a script) or `cli:LINE` (`deepen ARGS`, or `echo TEXT | deepen
ARGS`, run through `deepen_engine.commands.cli.main`). For item i it writes
`OUT_DIR/i.stdout`, `i.stderr`, `i.rc` (the exit status: 0, the `SystemExit` code, or 1
with the traceback in `i.stderr`) and `i.seconds` (its wall time, for the tier's summary).
"""

from __future__ import annotations

import contextlib
import io
import runpy
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def share_member_loads() -> Callable[[], None]:
    """Make a second load of the same local member spec return the first one's member;
    returns what puts the plain loader back."""
    from deepen_engine.members import loading

    original = loading.load_local_member
    loaded: dict[str, Any] = {}

    def load_once(spec: Any) -> Any:
        if isinstance(spec.source, tuple):  # ready objects: nothing to share
            return original(spec)
        key = spec.model_dump_json()
        if key not in loaded:
            loaded[key] = original(spec)
        return loaded[key]

    loading.load_local_member = load_once

    def restore() -> None:
        loading.load_local_member = original

    return restore


def close_open_ensembles() -> None:
    """Close the ensembles an item left open (their worker threads would keep them, and
    their caches, alive); the shared members stay loaded."""
    import gc
    import warnings

    from deepen_engine import Ensemble

    with warnings.catch_warnings():  # isinstance on some of torch's lazy module objects warns
        warnings.simplefilter("ignore")
        ensembles = [thing for thing in gc.get_objects() if isinstance(thing, Ensemble)]
    for ensemble in ensembles:
        with contextlib.suppress(Exception):
            ensemble.close()
    del ensembles
    gc.collect()


def cli_argv(line: str) -> tuple[list[str], str | None]:
    """`deepen ARGS` or `echo TEXT | deepen ARGS` as (ARGS, stdin text or None)."""
    stdin = None
    if "|" in line:
        left, line = (part.strip() for part in line.split("|", 1))
        words = shlex.split(left)
        if words[0] != "echo":
            raise ValueError(f"only `echo ... | deepen ...` pipes are supported: {left!r}")
        stdin = " ".join(words[1:]) + "\n"
    words = shlex.split(line, comments=True)
    if not words or words[0] != "deepen":
        raise ValueError(f"not a deepen command line: {line!r}")
    return words[1:], stdin


def run_item(item: str) -> int:
    """Run one item with this process's streams already redirected; its exit status."""
    kind, _, body = item.partition(":")
    if kind == "py":
        # as `python PATH` runs it: its folder first on the path, argv holding it alone
        # (a script that reads sys.argv[1:] must not see this runner's arguments)
        sys.path.insert(0, str(Path(body).parent))
        saved_argv, sys.argv = sys.argv, [body]
        try:
            runpy.run_path(body, run_name="__main__")
        finally:
            sys.argv = saved_argv
            sys.path.remove(str(Path(body).parent))
        return 0
    if kind == "cli":
        from deepen_engine.commands.cli import main

        argv, stdin = cli_argv(body)
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
        return int(main(argv) or 0)
    raise ValueError(f"unknown item kind {kind!r} in {item!r} (use py: or cli:)")


def main(out_dir: str, items: list[str]) -> None:
    """Run every item in order, writing each one's output and status under `out_dir`."""
    share_member_loads()
    out = Path(out_dir)
    for i, item in enumerate(items):
        stdout, stderr = io.StringIO(), io.StringIO()
        saved_stdin = sys.stdin
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    status = run_item(item)
                except SystemExit as exc:
                    code = exc.code
                    status = code if isinstance(code, int) else (0 if code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    status = 1
        finally:
            sys.stdin = saved_stdin
        close_open_ensembles()
        seconds = time.perf_counter() - start
        (out / f"{i}.stdout").write_text(stdout.getvalue(), encoding="utf-8")
        (out / f"{i}.stderr").write_text(stderr.getvalue(), encoding="utf-8")
        (out / f"{i}.rc").write_text(str(status), encoding="utf-8")
        (out / f"{i}.seconds").write_text(f"{seconds:.1f}", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
