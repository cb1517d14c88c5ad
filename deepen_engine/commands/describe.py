"""`deepen members`: load the members and describe them (name, source, vocabulary,
tokenizer kind, parameters, load time) and count the anchor tokens they share.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..alignment.vocabulary import find_anchors
from ..remote import load_members
from .options import member_options, member_specs
from .progress import announce_loading


def add_parser(sub: Any) -> None:
    """Register `deepen members`."""
    parser = sub.add_parser(
        "members", parents=[member_options()], help="load the members and describe them"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load and describe the members named by the arguments."""
    specs = announce_loading(member_specs(args))
    members = load_members(specs)  # Ray actors, if any, load in parallel
    rows = [
        {
            "name": m.name,
            "source": m.source_kind,
            "vocab_size": len(m.vocab),
            "tokenizer": m.vocab.kind,
            "parameters": m.num_parameters,
            "dtype": str(m.dtype).removeprefix("torch."),
            "device": str(m.device),
            "load_seconds": round(m.load_seconds, 2),
        }
        for m in members
    ]
    anchors = None
    if len(members) > 1:
        anchors = len(find_anchors([m.vocab for m in members], [m.name for m in members], 1))
    if args.json:
        print(json.dumps({"members": rows, "anchors": anchors}))
        return 0
    print(f"{'name':<24} {'source':<9} {'vocab':>8} {'tokenizer':<14} {'params':>12} {'load s':>7}")
    for r in rows:
        print(
            f"{r['name']:<24} {r['source']:<9} {r['vocab_size']:>8} {r['tokenizer']:<14} "
            f"{r['parameters']:>12,} {r['load_seconds']:>7}"
        )
    if anchors is not None:
        print(f"shared anchor tokens: {anchors}")
    return 0
