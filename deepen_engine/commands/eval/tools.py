"""`deepen eval --task tools`: do members and ensemble call the right tool with the right
arguments, with and without the grammar constraint?

The task (all fixed by the seed, generated here: no hand-written answers):

- tools (`TOOLS`): `get_weather(city, unit: enum)`, `convert_currency(amount: number,
  source: enum, target: enum)`, `set_alarm(time: {hour, minute}: nested object, label)`,
  `add_numbers(a: integer, b: integer)`;
- requests (`make_requests`): for each tool, user messages from a few templates filled with
  seeded values (cities, currencies, amounts, times, labels, numbers), the expected call
  computed from the same values; a share of requests needs no tool (small talk, a poem);
  shuffled with the seed;
- each system answers every request through `Ensemble.generate(messages, tools=TOOLS,
  tool_choice=...)` (`--tool-choice`: `auto`, the default, or `required`: a call is
  asked for, so a request needing no tool cannot be right), greedy, `MAX_NEW_TOKENS`
  tokens: constrained (the engine's grammar),
  and unconstrained (`tool_constraint=False`: the same prompt, free decoding, the reply
  parsed leniently: the first JSON object in it, code fences allowed);
- scores, each with a 95% Wilson interval:
  - valid-call rate: of the requests that need a tool, replies that are a call of a known
    tool whose arguments validate against its schema (jsonschema);
  - right-tool rate: of all requests, replies that call the expected tool, or make no call
    when none is needed;
  - exact-arguments rate: of the requests that need a tool, valid calls of the expected
    tool with exactly the expected arguments (numbers by value, strings case-folded).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...ensemble import Ensemble
from ...errors import ConfigError
from ...outputs import GenerationResult
from .task import wilson_interval

MAX_NEW_TOKENS = 48  # the longest expected call is 37 tokens (SmolLM2), 34 (Gemma-3)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "the city"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "source": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                    "target": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                },
                "required": ["amount", "source", "target"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Set an alarm at a time of day, with a label.",
            "parameters": {
                "type": "object",
                "properties": {
                    "time": {
                        "type": "object",
                        "properties": {
                            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                            "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                        },
                        "required": ["hour", "minute"],
                    },
                    "label": {"type": "string"},
                },
                "required": ["time", "label"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_numbers",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Madrid", "Toronto", "Rome"]
CURRENCIES = {"USD": "dollars", "EUR": "euros", "GBP": "pounds", "JPY": "yen"}
LABELS = ["gym", "work", "school", "medicine", "meeting", "flight"]
NO_TOOL = [
    "Hi! How are you today?",
    "Write a two-line poem about the sea.",
    "What is your favourite colour?",
    "Tell me a fun fact about cats.",
    "Say thank you in French.",
    "Who wrote Romeo and Juliet?",
]


@dataclass(frozen=True)
class Request:
    """One user message and the call it should get (None: no tool)."""

    message: str
    tool: str | None
    arguments: dict[str, Any] | None


def _weather(rng: random.Random) -> Request:
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
    text = rng.choice(
        [
            "What is the weather in {city} in {unit}?",
            "Tell me the current weather in {city}, in degrees {unit}.",
        ]
    )
    return Request(text.format(city=city, unit=unit), "get_weather", {"city": city, "unit": unit})


def _currency(rng: random.Random) -> Request:
    source, target = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([5, 20, 75, 100, 250, 1200])
    text = rng.choice(["Convert {n} {s} to {t}.", "How much is {n} {s} in {t}?"])
    message = text.format(n=amount, s=source, t=target)
    return Request(
        message, "convert_currency", {"amount": amount, "source": source, "target": target}
    )


def _alarm(rng: random.Random) -> Request:
    hour, minute, label = rng.randint(5, 22), rng.choice([0, 15, 30, 45]), rng.choice(LABELS)
    text = rng.choice(
        ["Set an alarm for {h}:{m:02d} labelled {label}.", "Wake me at {h}:{m:02d} for {label}."]
    )
    message = text.format(h=hour, m=minute, label=label)
    return Request(message, "set_alarm", {"time": {"hour": hour, "minute": minute}, "label": label})


def _add(rng: random.Random) -> Request:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    text = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}."])
    return Request(text.format(a=a, b=b), "add_numbers", {"a": a, "b": b})


MAKERS: list[Callable[[random.Random], Request]] = [_weather, _currency, _alarm, _add]


def make_requests(n: int, seed: int, no_tool_share: float = 0.2) -> list[Request]:
    """`n` seeded requests: tools in turn, and about `no_tool_share` needing none."""
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}.")
    rng = random.Random(seed)
    n_free = round(n * no_tool_share)
    requests = [Request(NO_TOOL[i % len(NO_TOOL)], None, None) for i in range(n_free)]
    requests += [MAKERS[i % len(MAKERS)](rng) for i in range(n - n_free)]
    rng.shuffle(requests)
    return requests


def lenient_call(text: str) -> tuple[str, Any] | None:
    """(name, arguments) of the first JSON object in a free reply that looks like a call."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return obj["name"], obj.get("arguments", obj.get("parameters"))


def _same(got: Any, want: Any) -> bool:
    """Equal arguments: numbers by value, strings case-folded and stripped, recursively."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, str):
        return isinstance(got, str) and got.strip().casefold() == want.casefold()
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == want
    return bool(got == want)


@dataclass
class ToolScore:
    """One system's counts over the requests, with a record per request."""

    system: str
    needing: int = 0  # requests that need a tool
    total: int = 0
    valid: int = 0
    right: int = 0
    exact: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, request: Request, result: GenerationResult, constrained: bool) -> None:
        """Judge one reply (see the module docstring)."""
        import jsonschema  # the `eval` extra

        if result.tool_calls:
            first = result.tool_calls[0]
            call: tuple[str, Any] | None = (first.name, first.arguments)
        else:
            call = None if constrained else lenient_call(result.text)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        valid = False
        if call is not None and call[0] in schemas and isinstance(call[1], dict):
            valid = jsonschema.Draft202012Validator(schemas[call[0]]).is_valid(call[1])
        name = call[0] if call is not None else None
        right = name == request.tool
        exact = valid and right and _same(call[1] if call else None, request.arguments)
        self.total += 1
        self.right += right
        if request.tool is not None:
            self.needing += 1
            self.valid += valid
            self.exact += exact
        self.records.append(
            {
                "system": self.system,
                "message": request.message,
                "expected_tool": request.tool,
                "expected_arguments": request.arguments,
                "reply": result.text,
                "call": list(call) if call is not None else None,
                "finish_reason": result.finish_reason,
                "valid": valid,
                "right_tool": right,
                "exact": exact,
            }
        )

    def summary(self) -> dict[str, Any]:
        """Rates and 95% Wilson intervals."""
        out: dict[str, Any] = {"system": self.system, "requests": self.total}
        for key, hits, of in (
            ("valid_call", self.valid, self.needing),
            ("right_tool", self.right, self.total),
            ("exact_arguments", self.exact, self.needing),
        ):
            low, high = wilson_interval(hits, of)
            out[key] = {
                "rate": round(hits / of, 4) if of else 0.0,
                "ci95": [round(low, 4), round(high, 4)],
                "count": [hits, of],
            }
        return out


def score_tools(
    system: str,
    view: Ensemble,
    requests: Sequence[Request],
    constrained: bool,
    batch_size: int,
    progress: Callable[[int], object] | None = None,
    tool_choice: str = "auto",
) -> ToolScore:
    """Ask every request of one system in one mode, in batches."""
    result = ToolScore(system=system)
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start : start + batch_size])
        replies = view.generate(
            [[{"role": "user", "content": r.message}] for r in chunk],
            tools=TOOLS,
            tool_choice=tool_choice,
            tool_constraint=constrained,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        for request, reply in zip(chunk, replies):
            result.add(request, reply, constrained)
        if progress is not None:
            progress(len(chunk))
    return result


def run_tools(
    ens: Ensemble, n: int, seed: int, batch_size: int, bar: Any, tool_choice: str = "auto"
) -> list[ToolScore]:
    """Every member alone and the ensemble `ens` (its main as given), constrained and
    unconstrained, on `n` requests of the seed.
    """
    requests = make_requests(n, seed)
    systems = [(m.name, ens.with_fusion(main=i, eta=0)) for i, m in enumerate(ens.members)]
    systems.append((f"ensemble (main {ens.members[ens.tools_main()].name})", ens))
    scores = []
    for name, view in systems:
        for constrained in (True, False):
            label = f"{name}, {'constrained' if constrained else 'unconstrained'}"
            scores.append(
                score_tools(label, view, requests, constrained, batch_size, bar.update, tool_choice)
            )
    return scores


def run_tools_eval(args: argparse.Namespace, ens: Ensemble) -> int:
    """`deepen eval --task tools`: score, write every reply, print the table or JSON."""
    if args.main is None:
        ens = ens.view(chat=True)  # the engine's chat rule
    n_runs = 2 * (len(ens.members) + 1) * args.n
    with tqdm(total=n_runs, desc="deepen eval tools", file=sys.stderr) as bar:
        scores = run_tools(ens, args.n, args.seed, args.batch_size, bar, args.tool_choice)
    output = Path(args.output)
    with output.open("w", encoding="utf-8") as f:
        for s in scores:
            for record in s.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {
        "task": f"tool calls (generated requests, tool_choice {args.tool_choice})",
        "seed": args.seed,
        "requests": args.n,
        "needing_a_tool": scores[0].needing,
        "tools": [t["function"]["name"] for t in TOOLS],
        "max_new_tokens": MAX_NEW_TOKENS,
        "members": [m.name for m in ens.members],
        "main": ens.members[ens.tools_main()].name,
        "eta": ens.fusion.eta,
        "results": [s.summary() for s in scores],
        "outputs": str(output),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"tool calls (tool_choice {args.tool_choice}), seed {args.seed}, {args.n} requests "
        f"({summary['needing_a_tool']} need a tool), tools {', '.join(summary['tools'])}"
    )
    print(f"{'system':56}{'valid call':>22}{'right tool':>22}{'exact args':>22}")
    for row in summary["results"]:
        cells = "".join(
            f"{row[k]['rate']:>8.1%} [{row[k]['ci95'][0]:.0%}, {row[k]['ci95'][1]:.0%}]".rjust(22)
            for k in ("valid_call", "right_tool", "exact_arguments")
        )
        print(f"{row['system']:56}{cells}")
    print(f"per-request outputs: {output}")
    return 0
