"""`deepen generate`: fused text for one prompt, stdin, or a JSONL file of prompts.

A single prompt without `--json` prints its text as it comes. With `--json` or
`--prompts-file`, one JSON object per prompt, in prompt order; `--stream` adds a
`{"index", "delta"}` line for each piece of text as it is decided.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..ensemble import Ensemble
from ..errors import ConfigError
from ..outputs import StreamEvent
from .inputs import read_prompts
from .options import (
    fusion_options,
    fusion_settings,
    generation_options,
    generation_settings,
    member_options,
    member_specs,
)


def add_parser(sub: Any) -> None:
    """Register `deepen generate`."""
    parser = sub.add_parser(
        "generate",
        parents=[member_options(), fusion_options(main_default=None), generation_options()],
        help="generate fused text for a prompt, stdin, or a file of prompts",
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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate for the prompts named by the arguments and print the results."""
    # every request setting is checked before the members load (seconds to minutes)
    prompts = read_prompts(args)
    config = generation_settings(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}.")
    ens = Ensemble(member_specs(args), **fusion_settings(args))
    if args.main is None and any(not isinstance(p, str) for p in prompts):
        ens = ens.with_fusion(main=ens.default_chat_main())  # the engine's chat rule
    plain = not args.json and args.prompts_file is None  # one prompt, text as it comes
    parts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    finals: dict[int, dict[str, Any]] = {}
    next_to_print = 0
    for event in ens.stream(prompts, config, batch_size=args.batch_size):
        if event.finish_reason is None:
            parts[event.index].append(event.delta)
            if plain:
                print(event.delta, end="", flush=True)
            elif args.stream:
                print(json.dumps({"index": event.index, "delta": event.delta}, ensure_ascii=False))
            continue
        finals[event.index] = result_json(ens, event, "".join(parts[event.index]))
        if plain:
            print()
            continue
        while next_to_print in finals:  # results in prompt order
            print(json.dumps(finals[next_to_print], ensure_ascii=False), flush=True)
            next_to_print += 1
    return 0


def result_json(ens: Ensemble, event: StreamEvent, text: str) -> dict[str, Any]:
    """The JSON object printed for one finished prompt."""
    usage = event.usage
    assert usage is not None  # final events carry usage
    return {
        "index": event.index,
        "text": text,
        "finish_reason": event.finish_reason,
        "main": ens.main.name,
        "members": [m.name for m in ens.members],
        "usage": {
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "fed_positions": usage.fed_positions,
            "forward_seconds": {k: round(v, 4) for k, v in usage.forward_seconds.items()},
            "fusion_seconds": round(usage.fusion_seconds, 4),
            "total_seconds": round(usage.total_seconds, 4),
        },
    }
