"""The `deepen` command line: one subcommand per module of this package.

    deepen generate "The capital of France is" --max-new-tokens 16
    deepen generate "Q: 12 + 7?" -m smollm2-135m-instruct -m gemma-3-270m --main 1 --json
    deepen members --json
    deepen eval --n 150 --seed 0
    deepen bench --json --plot bench.png
    deepen serve --port 8000

Text goes to stdout; progress bars and notes go to stderr. Options shared by several
commands come from `options.py`, their defaults from the engine's settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import DeepenError
from . import bench, demo, describe, generate, serve
from . import eval as evaluation
from .options import command_line_error


def build_parser() -> argparse.ArgumentParser:
    """The `deepen` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="deepen",
        description="Token-level ensembles of local LMs with different vocabularies (DeePEn).",
    )
    parser.add_argument("--version", action="version", version=f"deepen {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, demo, evaluation, bench, describe, serve):
        module.add_parser(sub)
    for command in sub.choices.values():  # main() reports unknown flags with its usage
        command.set_defaults(command_parser=command)
    return parser


def _version() -> str:
    """The installed deepen distribution's version ("unknown" from a bare checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("deepen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `deepen` console script."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's (exits with status 2)
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _quiet(getattr(args, "verbose", False))
    try:
        return int(args.run(args))
    except DeepenError as exc:
        # hints name the flags, not the Python settings (`--truncation left`)
        print(f"deepen: error: {command_line_error(exc)}", file=sys.stderr)
        return 2


def _quiet(verbose: bool) -> None:
    """Only deepen's own output, unless `--verbose`: transformers logs errors only, and
    the members load without other libraries' bars (`DEEPEN_VERBOSE`, members/quiet.py).
    """
    from transformers.utils import logging as transformers_logging

    logging: Any = transformers_logging  # untyped upstream
    if verbose:
        os.environ["DEEPEN_VERBOSE"] = "1"
        logging.set_verbosity_warning()
    else:
        logging.set_verbosity_error()


if __name__ == "__main__":
    raise SystemExit(main())
