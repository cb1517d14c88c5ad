"""Command-line options shared by the commands, with defaults and help taken from the
engine's own settings (`FusionConfig`, `GenerationConfig`, `MemberSpec`), so the command
line never restates a default.

Each `*_options()` returns a parent parser (`argparse.ArgumentParser(add_help=False)`)
that a subcommand lists in `parents=`.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from pydantic import BaseModel

from ..config import PROMPT_SCORES, WEIGHTINGS, FusionConfig, GenerationConfig, SchedulerConfig
from ..errors import ConfigError
from ..members import DEFAULT_MEMBERS, DTYPES, MemberSpec
from .inputs import stop_strings
from .member_settings import apply_member_options, read_members_file

_FLAGS: dict[tuple[str, str], str] = {}
"""(settings class, field) -> its command-line flag, for every option made by `_option`."""

METHODS = ("deepen", "union", "unite")  # FusionConfig.method's values
# --ray-* option -> MemberSpec field (Ray placement settings, given to every member)
RAY_OPTIONS = {
    "ray_address": ("address", "ADDR"),
    "ray_num_cpus": ("num_cpus", "N"),
    "ray_num_gpus": ("num_gpus", "N"),
    "step_timeout": ("step_timeout", "SECONDS"),
}


def _help(model: type[BaseModel], field: str, extra: str = "") -> str:
    """The field's first sentence, then its default: `Learning rate ... (default: 0.15)`."""
    info = model.model_fields[field]
    text = re.split(r"\.\s", info.description or "")[0].strip().rstrip(".")
    default = info.get_default(call_default_factory=True)
    shown = "none" if default in (None, []) else default
    return f"{text}{extra} (default: {shown})"


def _option(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    field: str,
    flag: str | None = None,
    **kwargs: Any,
) -> None:
    """One option for one settings field: its flag, default and help come from the field."""
    default = model.model_fields[field].get_default(call_default_factory=True)
    extra = kwargs.pop("extra_help", "")
    flag = flag or "--" + field.replace("_", "-")
    _FLAGS[(model.__name__, field)] = flag
    parser.add_argument(
        flag,
        dest=kwargs.pop("dest", field),
        default=kwargs.pop("default", default),
        help=kwargs.pop("help", None) or _help(model, field, extra),
        **kwargs,
    )


def member_options() -> argparse.ArgumentParser:
    """`--model/-m` once per member or `--models A B ...`, and where the members run."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--model",
        "-m",
        action="append",
        dest="models",
        metavar="MODEL",
        help="a member: embedded name, .gguf file, model folder or hub id; repeat for each "
        f"member (default: {' '.join(DEFAULT_MEMBERS)})",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        action="extend",
        dest="models",
        metavar="MODEL",
        help="several members at once (same list as --model)",
    )
    parser.add_argument(
        "--members-file",
        metavar="FILE",
        help="the members as a JSON list or TOML [[members]] tables, each a source and any "
        "MemberSpec fields (device_map, max_memory, dtype, ...); instead of --model",
    )
    parser.add_argument(
        "--member-option",
        action="append",
        metavar="[INDEX:]FIELD=VALUE",
        help="a MemberSpec field for every member, or member INDEX only, e.g. device_map=auto, "
        '\'max_memory={"0": "20GiB", "cpu": "60GiB"}\', 1:dtype=bfloat16; repeatable',
    )
    _option(parser, MemberSpec, "device", help="torch device of every member (default: cpu)")
    _option(
        parser,
        MemberSpec,
        "dtype",
        choices=sorted(DTYPES),
        help="dtype of every member's weights (default: float32)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="run every member in its own Ray actor (pip install 'deepen[ray]'); members "
        "forward in parallel, on this machine or a Ray cluster",
    )
    for option, (field, metavar) in RAY_OPTIONS.items():
        flag, kind = "--" + option.replace("_", "-"), str if field == "address" else float
        _option(
            parser, MemberSpec, field, flag, dest=option, type=kind, default=None, metavar=metavar
        )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own output while loading (transformers' warnings and "
        "progress bars); by default deepen shows one bar per long step and nothing else",
    )
    return parser


def fusion_options(
    *, main_default: int | None = None, weights: bool = True, methods: bool = False
) -> argparse.ArgumentParser:
    """The fusion settings (FusionConfig). `main_default=None`: the engine's default leader
    (FusionConfig.main, `auto`); an index fixes it for the command (bench times one
    leader); `weights=False` leaves `--weights` to the command; `methods=True` lets
    `--method` take several methods (or `all`) and `--weighting` several weightings, for
    the command to compare, and `--main` take `dev` as well.
    """
    parser = argparse.ArgumentParser(add_help=False)
    shown = FusionConfig().main if main_default is None else main_default
    main_help = "index of the main member, or auto: per prompt, the member that reads it best "
    main_help += "(lowest bits per byte; chat prompts among the members with a chat template)"
    if methods:
        main_help += ", or dev: on each task the best member alone on the dev set"
    main_help += f" (default: {shown})"
    _option(
        parser,
        FusionConfig,
        "main",
        type=_compared_main if methods else _main_index,
        metavar="INDEX",
        default=main_default,
        help=main_help,
    )
    if weights:
        _option(parser, FusionConfig, "weights", type=float, nargs="+", metavar="W")
    if methods:
        parser.add_argument(
            "--method",
            nargs="+",
            choices=[*METHODS, "all"],
            default=None,
            help="fusion methods to compare, each on the same questions, or all (default: deepen)",
        )
    else:
        _option(parser, FusionConfig, "method", choices=list(METHODS))
    if methods:
        parser.add_argument(
            "--weighting",
            nargs="+",
            choices=list(WEIGHTINGS),
            default=None,
            help="how the weights apply per step (FusionConfig.weighting); several: each "
            f"method with each (default: {FusionConfig.model_fields['weighting'].default})",
        )
    else:
        _option(parser, FusionConfig, "weighting", choices=list(WEIGHTINGS))
    _option(parser, FusionConfig, "weight_temperature", type=float)
    _option(parser, FusionConfig, "prompt_score", choices=list(PROMPT_SCORES))
    _option(parser, FusionConfig, "gate", choices=["off", "agree", "confident"])
    _option(parser, FusionConfig, "gate_threshold", type=float)
    _option(parser, FusionConfig, "eta", type=float)
    _option(parser, FusionConfig, "steps", type=int)
    _option(parser, FusionConfig, "tau", type=float)
    _option(parser, FusionConfig, "top_k", "--fusion-top-k", dest="fusion_top_k", type=int)
    _option(parser, FusionConfig, "top_mass", type=float)
    _option(parser, FusionConfig, "candidates", type=int)
    _option(parser, FusionConfig, "unite_top_k", type=int)
    _option(parser, FusionConfig, "min_anchors", type=int)
    _option(parser, FusionConfig, "fusion_device", metavar="DEVICE")
    return parser


def _main_index(text: str) -> int | str:
    """`--main`: a member index, or `auto` (per prompt, the lowest bits per byte)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a member index or auto, got {text!r}") from None


def _drafter(text: str) -> int | str:
    """`--drafter`: `main`, `auto`, `lookup` or a member index."""
    if text in ("main", "auto", "lookup"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give main, auto, lookup or a member index, got {text!r}"
        ) from None


def _compared_main(text: str) -> int | str:
    """`--main` of a comparing command: an index, `auto`, or `dev` (the command's choice:
    the best member alone on its dev set).
    """
    if text == "dev":
        return text
    try:
        return _main_index(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"give a member index, auto or dev, got {text!r}"
        ) from None


def generation_options() -> argparse.ArgumentParser:
    """The generation settings (GenerationConfig)."""
    parser = argparse.ArgumentParser(add_help=False)
    _option(parser, GenerationConfig, "max_new_tokens", type=int, metavar="N")
    _option(parser, GenerationConfig, "min_new_tokens", type=int, metavar="N")
    _option(
        parser, GenerationConfig, "stop", action="append", default=None, extra_help="; repeatable"
    )
    _option(parser, GenerationConfig, "temperature", type=float)
    _option(parser, GenerationConfig, "top_p", type=float)
    _option(parser, GenerationConfig, "top_k", type=int)
    _option(parser, GenerationConfig, "seed", type=int)
    _option(parser, GenerationConfig, "truncation", choices=["error", "left"])
    _option(
        parser,
        GenerationConfig,
        "speculate",
        type=int,
        metavar="K",
        help="Speculative fused decoding: the drafter proposes up to K tokens per step, the "
        "fused distribution verifies them; the same output as 0 (docs/speculative.md) "
        "(default: 4 with members in process, 0 with --ray; 0: off)",
    )
    _option(parser, GenerationConfig, "drafter", type=_drafter, metavar="MEMBER")
    parser.add_argument(
        "--escape",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn \\n, \\t, \\r and \\\\ in the prompt argument and --stop strings into "
        "newline, tab, carriage return and backslash, as llama.cpp does; --no-escape keeps "
        "them as typed (default: on)",
    )
    return parser


def scheduler_options() -> argparse.ArgumentParser:
    """How requests share the members (SchedulerConfig): here, how long prompts are read."""
    parser = argparse.ArgumentParser(add_help=False)
    _option(parser, SchedulerConfig, "prefill_chunk", type=int, metavar="N")
    return parser


def member_specs(args: argparse.Namespace, ray: bool | None = None) -> list[MemberSpec]:
    """The members named by --model/--models (default: the embedded defaults), in Ray
    actors with --ray and the --ray-* settings. `ray` overrides --ray (the bench builds
    both kinds).
    """
    sources = args.models or list(DEFAULT_MEMBERS)
    placed = getattr(args, "ray", False) if ray is None else ray
    given = {f: getattr(args, o) for o, (f, _) in RAY_OPTIONS.items() if getattr(args, o, None)}
    if given and not placed and ray is None:
        flags = ", ".join("--" + o.replace("_", "-") for o in RAY_OPTIONS if getattr(args, o))
        raise ConfigError(f"{flags} apply to members in Ray actors: add --ray.")
    extra = {"placement": "ray", **given} if placed else {}
    members_file = getattr(args, "members_file", None)
    if members_file and args.models:
        raise ConfigError("give the members with --model or with --members-file, not both.")
    if members_file:
        members = read_members_file(members_file)
    else:
        # --device only when given or needed: a device_map option excludes it
        place = {"device": args.device} if args.device != "cpu" else {}
        members = [{"source": s, **place, "dtype": args.dtype} for s in sources]
    members = apply_member_options(members, getattr(args, "member_option", None))
    return [MemberSpec(**{**extra, **m}) for m in members]


def fusion_settings(args: argparse.Namespace) -> dict[str, Any]:
    """FusionConfig keywords from the parsed fusion options (`main` only when given;
    `--main auto` is `main="auto"`; a comparing command's `--main dev` is its own choice).
    """
    out: dict[str, Any] = {
        "gate": args.gate,
        "gate_threshold": args.gate_threshold,
        "weight_temperature": args.weight_temperature,
        "prompt_score": args.prompt_score,
        "top_mass": args.top_mass,
        "unite_top_k": args.unite_top_k,
        "eta": args.eta,
        "steps": args.steps,
        "tau": args.tau,
        "top_k": args.fusion_top_k,
        "candidates": args.candidates,
        "min_anchors": args.min_anchors,
        "fusion_device": args.fusion_device,
    }
    for key in ("method", "weighting"):  # a command comparing several passes a list
        if isinstance(getattr(args, key), str):
            out[key] = getattr(args, key)
    if isinstance(args.main, int):  # None: the command's rule
        out["main"] = args.main
    elif args.main == "auto":  # per request; "dev": the comparing command's choice
        out["main"] = "auto"
    weights = getattr(args, "weights", None)
    if isinstance(weights, list) and all(isinstance(w, float) for w in weights):
        out["weights"] = weights
    return out


def generation_settings(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the parsed generation options."""
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        stop=stop_strings(args),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        truncation=args.truncation,
        speculate=args.speculate,
        drafter=args.drafter,
    )


_QUALIFIED = re.compile(r"\b(\w+Config|MemberSpec)\.(\w+)(?:=('[^']*'|\[[^\]]*\]|[\w.\-]*\w))?")
_KEYWORD = re.compile(r"\b([a-z][a-z_]*)=('[^']*'|\[[^\]]*\]|[\w.\-]*\w)")
_BARE = re.compile(r"(?<![\w.\-])([a-z]+(?:_[a-z]+)+)\b(?!=)")


def command_line_error(exc: Exception) -> str:
    """An error as the command line words it: a `ConfigError` about a setting that has a
    flag is named by that flag, read from `ConfigError.field` (`--eta: Input should be
    ...`); names inside the text (hints) are reworded by `command_line_words`.
    """
    if isinstance(exc, ConfigError) and exc.field is not None and exc.owner is not None:
        flag = _FLAGS.get((exc.owner, exc.field))
        if flag is not None:
            return f"{flag}: {command_line_words(exc.reason)}"
    return command_line_words(str(exc))


def command_line_words(message: str) -> str:
    """An engine error message worded for the command line: the settings it names become
    the flags that set them (`truncation='left'` -> `--truncation left`,
    `FusionConfig.main=5` -> `--main 5`, `max_new_tokens` -> `--max-new-tokens`).

    Only settings that have a flag are rewritten; a name two flags share (`top_k`) is
    rewritten only where its settings class is named.
    """
    by_name: dict[str, set[str]] = {}
    for (_, field), flag in _FLAGS.items():
        by_name.setdefault(field, set()).add(flag)

    def unique(field: str) -> str | None:
        flags = by_name.get(field, set())
        return next(iter(flags)) if len(flags) == 1 else None

    def with_value(flag: str, value: str | None) -> str:
        if value is None:
            return flag
        value = value.strip("'")
        if value.startswith("["):
            value = " ".join(v.strip(" '") for v in value.strip("[]").split(","))
        return f"{flag} {value}"

    def qualified(match: re.Match[str]) -> str:
        flag = _FLAGS.get((match[1], match[2]))
        return match[0] if flag is None else with_value(flag, match[3])

    def keyword(match: re.Match[str]) -> str:
        flag = unique(match[1])
        return match[0] if flag is None else with_value(flag, match[2])

    def bare(match: re.Match[str]) -> str:
        return unique(match[1]) or match[0]

    message = _QUALIFIED.sub(qualified, message)
    message = _KEYWORD.sub(keyword, message)
    return _BARE.sub(bare, message)
