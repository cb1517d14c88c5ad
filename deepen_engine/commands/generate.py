"""`deepen generate`: fused text for a prompt, stdin, or a JSONL file of many prompts.

A single prompt without `--json` prints its text as it comes. With `--json` or
`--prompts-file`, one JSON object per prompt, in prompt order; `--stream` adds a
`{"index", "delta"}` line for each piece of text as it is decided.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from ..config import SchedulerConfig
from ..ensemble import Ensemble
from ..errors import ConfigError
from ..outputs import StreamEvent
from ..requests import Prompt
from . import progress
from .inputs import read_prompts
from .options import (
    fusion_options,
    fusion_settings,
    generation_options,
    generation_settings,
    member_options,
    member_specs,
    scheduler_options,
)


def add_parser(sub: Any) -> None:
    """Register `deepen generate`."""
    parser = sub.add_parser(
        "generate",
        parents=[
            member_options(),
            fusion_options(),
            generation_options(),
            scheduler_options(),
        ],
        help="generate fused text for a prompt, stdin, or a file of prompts",
        description="Fused text for one prompt (an argument, or stdin), or for many: a JSONL "
        "file of text prompts and chat conversations, decoded in batches. Each prompt is "
        "led by the member that reads it best (chat prompts: among the members with a chat "
        "template) unless --main names one.",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads stdin")
    parser.add_argument(
        "--prompts-file",
        help="JSONL file, one object per line with 'prompt' (text) or 'messages' (chat); "
        "prints one JSON result per line, in order",
    )
    parser.add_argument(
        "--batch-size", type=int, help="prompts decoded together (default: all at once)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="with --json or --prompts-file: print each text delta as a JSON line as it comes",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr while the prompts are read and tokens chosen (default: "
        "when stderr is a terminal, unless JSON goes to a pipe or file)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate for the prompts named by the arguments and print the results."""
    # every request setting is checked before the members load (seconds to minutes)
    if args.stream and not args.json and args.prompts_file is None:
        raise ConfigError(
            "--stream prints JSON lines and needs --json or --prompts-file; without them a "
            "single prompt's text is already printed as it comes (drop --stream, or add --json)."
        )
    prompts = read_prompts(args)
    config = generation_settings(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}.")
    scheduler = SchedulerConfig(prefill_chunk=args.prefill_chunk)
    specs = member_specs(args)
    if args.progress is not False:  # --no-progress: nothing on stderr
        progress.announce_loading(specs)
    ens = Ensemble(specs, scheduler=scheduler, **fusion_settings(args))
    views = _views(ens, prompts, args.main is None)
    plain = not args.json and args.prompts_file is None  # one prompt, text as it comes
    bars = progress.Bars(generation=not plain) if progress.wanted(args) else None

    def events() -> Iterator[tuple[Ensemble, StreamEvent]]:
        """Each group of prompts with one main member, in turn; indices in the file's order."""
        for view, indices in _groups(views):
            group = [prompts[i] for i in indices]
            for event in view.stream(group, config, batch_size=args.batch_size, progress=bars):
                yield view, replace(event, index=indices[event.index])

    try:
        _print_results(events(), args, plain, bars)
    finally:
        if bars is not None:
            bars.close()
        ens.close()  # its worker thread, and Ray actors (--ray) with their resources
    return 0


def _views(ens: Ensemble, prompts: list[Prompt], chat_rule: bool) -> list[Ensemble]:
    """The ensemble view for each prompt: with `chat_rule` (no --main), chat prompts are
    led by the engine's choice for chat (`default_chat_main`), text prompts by the main.
    """
    chat = ens.view(chat=True) if chat_rule else ens
    return [ens if isinstance(p, str) else chat for p in prompts]


def _groups(views: list[Ensemble]) -> list[tuple[Ensemble, list[int]]]:
    """Prompt indices by view, in order of first appearance."""
    groups: dict[int, tuple[Ensemble, list[int]]] = {}
    for i, view in enumerate(views):
        groups.setdefault(id(view), (view, []))[1].append(i)
    return list(groups.values())


def _print_results(
    events: Iterator[tuple[Ensemble, StreamEvent]],
    args: argparse.Namespace,
    plain: bool,
    bars: progress.Bars | None,
) -> None:
    """Plain text as it comes, or JSON lines: deltas (`--stream`) and results in order."""
    parts: dict[int, list[str]] = {}
    finals: dict[int, dict[str, Any]] = {}
    next_to_print = 0
    for ens, event in events:
        lines: list[str] = []
        if event.finish_reason is None:
            parts.setdefault(event.index, []).append(event.delta)
            if plain:
                print(event.delta, end="", flush=True)
            elif args.stream:
                delta = {"index": event.index, "delta": event.delta}
                lines.append(json.dumps(delta, ensure_ascii=False))
        elif plain:
            print(flush=True)
        else:
            text = "".join(parts.get(event.index, []))
            finals[event.index] = result_json(ens, event, text)
            while next_to_print in finals:  # results in prompt order
                lines.append(json.dumps(finals[next_to_print], ensure_ascii=False))
                next_to_print += 1
        if lines:
            with bars.printing() if bars is not None else nullcontext():
                print("\n".join(lines), flush=True)


def result_json(ens: Ensemble, event: StreamEvent, text: str) -> dict[str, Any]:
    """The JSON object printed for one finished prompt."""
    usage = event.usage
    assert usage is not None  # final events carry usage
    return {
        "index": event.index,
        "text": text,
        "finish_reason": event.finish_reason,
        "main": usage.leader or ens.main.name,
        "members": [m.name for m in ens.members],
        "usage": {
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "fed_positions": usage.fed_positions,
            "forward_seconds": {k: round(v, 4) for k, v in usage.forward_seconds.items()},
            "fusion_seconds": round(usage.fusion_seconds, 4),
            "total_seconds": round(usage.total_seconds, 4),
            # each member's bits per byte of the prompt (weighting="prompt"; else empty)
            "prompt_bits_per_byte": _rounded(usage.prompt_bits_per_byte),
        },
    }


def _rounded(scores: dict[str, float | None]) -> dict[str, float | None]:
    """Prompt scores to 4 decimals (None kept: a prompt too short to score)."""
    return {k: None if v is None else round(v, 4) for k, v in scores.items()}
