"""The `deepen` command line.

    deepen generate "The capital of France is" --max-new-tokens 16
    deepen generate "Q: 12 + 7?" -m smollm2-135m-instruct -m gemma-3-270m --main 1 --json
    deepen members --json
    deepen eval --n 150 --seed 0
    deepen bench --json --plot bench.png

Text goes to stdout; progress bars and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .embedded import DEFAULT_MEMBERS
from .errors import ConfigError, DeepenError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepen",
        description="Token-level ensembles of local LMs with different vocabularies (DeePEn).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate fused text for one prompt")
    gen.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads stdin")
    _add_members(gen)
    gen.add_argument("--main", type=int, default=0, help="index of the main member (default 0)")
    gen.add_argument("--weights", type=float, nargs="+", help="one weight per member")
    gen.add_argument("--eta", type=float, default=0.15, help="inverse-search rate; 0 = main alone")
    gen.add_argument("--steps", type=int, default=5, help="inverse-search steps (default 5)")
    gen.add_argument(
        "--min-anchors", type=int, default=1000, help="fewest shared tokens accepted (1000)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument(
        "--min-new-tokens", type=int, default=0, help="tokens before an end token may come (0)"
    )
    gen.add_argument(
        "--truncation",
        choices=["error", "left"],
        default="error",
        help="a prompt too long for a member: refuse it (error, default) or drop each "
        "member's oldest prompt tokens (left)",
    )
    gen.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    gen.add_argument(
        "--prompts-file",
        help="JSONL file, one object per line with 'prompt' (text) or 'messages' (chat); "
        "prints one JSON result per line, in order",
    )
    gen.add_argument("--batch-size", type=int, help="prompts decoded together (default: all)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    gen.add_argument("--seed", type=int, help="seed of each row's sampling stream")
    gen.add_argument(
        "--stream",
        action="store_true",
        help="with --json or --prompts-file: print each text delta as a JSON line as it comes",
    )
    gen.add_argument("--device", default="cpu", help="torch device for every member")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    ev = sub.add_parser("eval", help="capital-city QA: each member alone vs the ensemble")
    _add_members(ev)
    ev.add_argument("--main", type=int, default=0, help="index of the main member (default 0)")
    ev.add_argument(
        "--weights",
        nargs="+",
        help="one weight per member, or 'adaptive' (weights from dev accuracy, DeePEn-Adapt)",
    )
    ev.add_argument("--eta", type=float, default=0.15)
    ev.add_argument("--steps", type=int, default=5)
    ev.add_argument("--n", type=int, default=150, help="test questions (default 150)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the question split")
    ev.add_argument("--shots", type=int, default=4)
    ev.add_argument("--dev-size", type=int, default=50)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--min-anchors", type=int, default=1000)
    ev.add_argument("--output", default="deepen-eval.jsonl", help="per-question outputs (JSONL)")
    ev.add_argument(
        "--sweep-eta",
        type=float,
        nargs="+",
        help="sweep mode: score the ensemble on the dev set for each of these etas",
    )
    ev.add_argument("--sweep-steps", type=int, nargs="+", help="sweep: steps values (--steps)")
    ev.add_argument("--sweep-main", type=int, nargs="+", help="sweep: main members (--main)")
    ev.add_argument(
        "--sweep-output",
        default="deepen-sweep",
        help="sweep: writes PREFIX.json, PREFIX.md (table) and PREFIX.png (plot)",
    )
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    bench = sub.add_parser(
        "bench", help="speed, memory and fidelity of the ensemble against its members"
    )
    _add_members(bench)
    bench.add_argument("--main", type=int, default=0, help="index of the main member (default 0)")
    bench.add_argument("--eta", type=float, default=0.15)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--min-anchors", type=int, default=1000)
    bench.add_argument(
        "--new-tokens", type=int, default=64, help="tokens per row in the batch runs (64)"
    )
    bench.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (1 4 8)"
    )
    bench.add_argument(
        "--long-tokens",
        type=int,
        default=512,
        help="length of the batch-1 runs: ms/token curve and re-encoding baseline (512)",
    )
    bench.add_argument(
        "--fidelity-prompts", type=int, default=4, help="prompts of the fidelity check (4; 0: skip)"
    )
    bench.add_argument(
        "--fidelity-tokens", type=int, default=8, help="tokens per fidelity prompt (8)"
    )
    bench.add_argument(
        "--leftout-mass",
        type=float,
        default=1e-4,
        help="reference fusion: probability of a member's rarest non-anchor tokens it may "
        "leave out (1e-4; 0 = every token, minutes per step for a 262k vocabulary)",
    )
    bench.add_argument("--plot", help="write a PNG of ms/token against new tokens here")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--json", action="store_true", help="print every figure as one JSON object")

    mem = sub.add_parser("members", help="load the members and describe them")
    _add_members(mem)
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    mem.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _add_members(parser: argparse.ArgumentParser) -> None:
    """`--model/-m` once per member, or `--models` with several at once (same list)."""
    parser.add_argument(
        "--model",
        "-m",
        action="append",
        dest="models",
        help="a member: embedded name, .gguf file, model folder or hub id; repeat for each "
        f"member (default: {' '.join(DEFAULT_MEMBERS)})",
    )
    parser.add_argument(
        "--models", nargs="+", action="extend", dest="models", help="several members at once"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `deepen` console script."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            from .eval_command import run_eval

            return run_eval(args)
        if args.command == "bench":
            from .benchmark import run_bench

            return run_bench(args)
        return _members(args)
    except DeepenError as exc:
        print(f"deepen: error: {exc}", file=sys.stderr)
        return 2


def specs(args: argparse.Namespace) -> list[Any]:
    """The members named by --model (default: the embedded defaults), as MemberSpecs."""
    from .members import MemberSpec

    sources = args.models or list(DEFAULT_MEMBERS)
    return [MemberSpec(source=s, device=args.device, dtype=args.dtype) for s in sources]


def _generate(args: argparse.Namespace) -> int:
    from .config import GenerationConfig
    from .ensemble import Ensemble

    prompts = _read_prompts(args)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        truncation=args.truncation,
        stop=args.stop,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    ens = Ensemble(
        specs(args),
        main=args.main,
        weights=args.weights,
        eta=args.eta,
        steps=args.steps,
        min_anchors=args.min_anchors,
    )
    plain = not args.json and args.prompts_file is None  # one prompt, text as it comes
    parts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    finals: dict[int, dict] = {}
    next_to_print = 0
    for event in ens.stream(prompts, gen, batch_size=args.batch_size):
        if event.finish_reason is None:
            parts[event.index].append(event.delta)
            if plain:
                print(event.delta, end="", flush=True)
            elif args.stream:
                print(json.dumps({"index": event.index, "delta": event.delta}, ensure_ascii=False))
            continue
        finals[event.index] = _result_json(ens, event, "".join(parts[event.index]))
        if plain:
            print()
            continue
        while next_to_print in finals:  # results in prompt order
            print(json.dumps(finals[next_to_print], ensure_ascii=False), flush=True)
            next_to_print += 1
    return 0


def _read_prompts(args: argparse.Namespace) -> list[Any]:
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ConfigError("give either a prompt or --prompts-file, not both.")
        return _read_jsonl(args.prompts_file)
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ConfigError("give a prompt, pipe one on stdin, or use --prompts-file.")
        prompt = sys.stdin.read()
    return [prompt]


def _read_jsonl(path: str) -> list[Any]:
    prompts: list[Any] = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise ConfigError(f"--prompts-file {path!r} cannot be read: {exc}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n} is not valid JSON: {exc}") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise ConfigError(
                f"{path}:{n} must be an object with exactly one of 'prompt' or 'messages'."
            )
        prompts.append(item["prompt"] if "prompt" in item else item["messages"])
    if not prompts:
        raise ConfigError(f"--prompts-file {path!r} holds no prompts.")
    return prompts


def _result_json(ens: Any, event: Any, text: str) -> dict:
    usage = event.usage
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


def _members(args: argparse.Namespace) -> int:
    from .members import load_member
    from .vocabulary import find_anchors

    members = [load_member(spec) for spec in specs(args)]
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


if __name__ == "__main__":
    raise SystemExit(main())
