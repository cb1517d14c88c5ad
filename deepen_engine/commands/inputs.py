"""What `deepen generate` reads: a prompt argument, stdin, or a JSONL file of prompts.

Everything is checked before any model loads, so a mistake costs no load time:

1. Bytes that are not UTF-8 raise `ConfigError` naming where they are (the byte offset,
   and the line of a prompts file).
2. Escape sequences (`\\n`, `\\t`, `\\r`, `\\\\`) in the prompt argument and in `--stop`
   strings become the characters they name, as llama.cpp's command line does, since a
   shell passes `"\\n"` as a backslash and an `n`; `--no-escape` keeps them as typed.
   Stdin and prompts files are text already (real newlines, JSON escapes) and are taken
   as they are.
3. The prompts are checked by the engine's own rule (`check_prompts`: not empty, valid
   text, well-formed chat messages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ConfigError
from ..requests import Prompt, check_prompts

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
"""The escape sequences `unescape` turns into characters; any other backslash stays."""


def unescape(text: str) -> str:
    """`text` with `\\n`, `\\t`, `\\r` and `\\\\` turned into newline, tab, carriage return
    and backslash; any other backslash is kept as it is (`\\x` stays `\\x`).
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        pair = text[i : i + 2]
        if len(pair) == 2 and pair[0] == "\\" and pair[1] in ESCAPES:
            out.append(ESCAPES[pair[1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or `ConfigError` naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[max(0, exc.start - 20) : exc.start].decode("utf-8", errors="replace")
        raise ConfigError(
            f"{what} is not UTF-8 text: byte {exc.start} (0x{data[exc.start]:02x}, after "
            f"{before!r}) cannot be decoded. Give UTF-8 text, e.g. convert it with "
            "`iconv -f latin1 -t utf-8`."
        ) from None


def argument_text(value: str, what: str) -> str:
    """A command-line argument as text, refusing bytes that are not UTF-8.

    Python turns argument bytes it cannot decode into lone surrogates; `os.fsencode`
    gives the bytes back, so the error can say where the bad byte is.
    """
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        decode_utf8(os.fsencode(value), what)
    return value


def stop_strings(args: argparse.Namespace) -> list[str]:
    """The `--stop` strings: checked as text, escape sequences processed unless
    `--no-escape`.
    """
    stops = [argument_text(s, f"--stop string {s!r}") for s in args.stop or []]
    return [unescape(s) for s in stops] if args.escape else stops


def read_prompts(args: argparse.Namespace) -> list[Prompt]:
    """The prompts named by `deepen generate`'s arguments, checked."""
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ConfigError("give either a prompt or --prompts-file, not both.")
        return read_jsonl(args.prompts_file)
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ConfigError("give a prompt, pipe one on stdin, or use --prompts-file.")
        prompt = decode_utf8(sys.stdin.buffer.read(), "the prompt read from stdin")
        if not prompt:
            raise ConfigError("stdin held no prompt; pipe some text, or give a prompt.")
    else:
        prompt = argument_text(prompt, "the prompt argument")
        if args.escape:
            prompt = unescape(prompt)
        if not prompt:  # before check_prompts, whose words ("position 0") are Python's
            raise ConfigError("the prompt is empty; give some text to continue.")
    return check_prompts([prompt])


def read_jsonl(path: str) -> list[Prompt]:
    """Prompts of a JSONL file: one object per line with `prompt` or `messages`, each
    checked; errors name the file and line.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as exc:
        raise ConfigError(f"--prompts-file {path!r} cannot be read: {exc}") from None
    prompts: list[Prompt] = []
    for n, raw in enumerate(lines, start=1):
        line = decode_utf8(raw, f"{path}:{n}")
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
        if item.get("prompt") == "":  # before check_prompts, whose words are Python's
            raise ConfigError(f"{path}:{n}: the prompt is empty; give some text to continue.")
        try:
            prompts.extend(check_prompts([item.get("prompt", item.get("messages"))]))
        except ConfigError as exc:
            raise ConfigError(f"{path}:{n}: {exc}") from None
    if not prompts:
        raise ConfigError(f"--prompts-file {path!r} holds no prompts.")
    return prompts
