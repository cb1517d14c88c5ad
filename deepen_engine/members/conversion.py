"""GGUF members as transformers folders: converted once, written so that later loads are
cheap in memory.

A GGUF file is dequantised once into a folder of `dtype` weights (`convert_gguf`). Its
tokenizer is written so that `AutoTokenizer.from_pretrained` builds it in Rust straight
from `tokenizer.json` (`write_tokenizer`):

1. `tokenizer_config.json` names the generic `TokenizersBackend` class (with the padding
   side and input names of the class it replaces). A class with its own `__init__`
   (Gemma's) makes transformers parse the whole `tokenizer.json` into Python and rebuild
   the tokenizer from those objects;
2. it lists, of the added tokens, those that are named special tokens (bos, eos, ...):
   transformers builds an `AddedToken` for every token listed and keeps them all, 7-10
   MB for Gemma-3's 6,384 added tokens (mostly `<unusedN>`), while the tokenizer has
   its added tokens from `tokenizer.json` anyway; a config with no list makes it parse
   `tokenizer.json` once more to find them;
3. BPE merges are written as `"a b"` strings rather than `["a", "b"]` pairs when no piece
   holds a space: the Rust parser buffers every pair as a small sequence first.

Gemma-3-270m's tokenizer (262,144 tokens, 514,906 merges) loads with a peak of 164 MB
written this way against 461 MB before, and `AutoTokenizer` keeps 92 MB against 265 MB
(members load it with less: tokenizer_file.py; `scripts/tokenizer_memory.py`,
docs/benchmarks.md), with the same vocabulary, special tokens and ids (checked after every
write).

Folders converted before this (no `deepen_conversion.json` of `FORMAT`) are upgraded in
place on their next load: the tokenizer files are rewritten (each file atomically), the
weights are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import MemberLoadError
from .tokenizer_file import load_tokenizer

FORMAT = 3  # what a conversion writes; 1: the tokenizer as transformers saves it; 2: the
# config listed every added token
MARKER = "deepen_conversion.json"

# Texts a rewritten tokenizer must encode as the original did: words, both kinds of
# space, digits, an added token's text, a rare character (byte fallback) and markers.
_PROBES = (
    "The capital of France is Paris.\n\nQ: 12 + 7 = ?\tA:  19",
    "<start_of_turn>user\nhi<end_of_turn> <|im_start|>assistant<|im_end|> 日本語 😀 \x01",
)


def ensure_folder(folder: Path, gguf: Callable[[], Path], name: str, dtype: torch.dtype) -> None:
    """Make `folder` the current conversion of the GGUF file `gguf()` returns: convert
    when it is missing, rewrite the tokenizer files of an older conversion.
    """
    if not (folder / "config.json").is_file():
        convert_gguf(gguf(), folder, name, dtype)
    elif _format(folder) < FORMAT:
        try:
            upgrade(folder, name)
        except OSError as exc:  # a cache this user cannot write: the old files still load
            warnings.warn(
                f"Member {name!r}: could not rewrite the tokenizer of {folder} ({exc}); it "
                "loads as it is, with more memory. Make the folder writable, or delete it "
                "to convert the member again.",
                stacklevel=2,
            )


def _format(folder: Path) -> int:
    try:
        return int(json.loads((folder / MARKER).read_text())["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def convert_gguf(gguf: Path, folder: Path, name: str, dtype: torch.dtype = torch.float32) -> None:
    """Dequantise a GGUF file once into a transformers folder of `dtype` weights (atomic:
    tmp dir + rename).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with (
            tqdm(total=3, desc=f"Converting {name} from GGUF (first load only)") as bar,
            _read_once(gguf),
        ):
            bar.set_postfix_str("tokenizer")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            except Exception as exc:
                raise MemberLoadError(
                    f"Member {name!r}: the tokenizer in {gguf} could not be loaded: {exc}"
                ) from exc
            bar.update()
            bar.set_postfix_str("weights")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=dtype
                )
            except ValueError as exc:
                raise MemberLoadError(
                    f"Member {name!r}: {gguf} is not a causal language model transformers can "
                    f"load: {exc}"
                ) from exc
            bar.update()
            bar.set_postfix_str("saving")
            # The weights are plain `dtype` tensors now; without clearing the GGUF quantisation
            # marker save_pretrained refuses to write them.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None  # type: ignore[assignment]  # stubs type it as a Module
            model.is_quantized = False  # type: ignore[assignment]
            model.save_pretrained(tmp)
            write_tokenizer(tokenizer, tmp, name)
            _write_marker(tmp)
            bar.update()
        if folder.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def upgrade(folder: Path, name: str) -> None:
    """Rewrite the tokenizer files of an older conversion in `folder` (weights kept).

    Each file is written in a temporary folder and moved in with `os.replace`, so a process
    reading the folder meanwhile sees the old file or the new one, which load the same
    tokenizer; the marker comes last, so an interrupted upgrade is redone.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-tokenizer-", dir=folder.parent))
    try:
        write_tokenizer(tokenizer, tmp, name)
        _write_marker(tmp)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == MARKER)  # the marker last
        for file in files:
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tokenizer(tokenizer: Any, folder: Path, name: str) -> None:
    """Save `tokenizer` in `folder` in the form that loads in Rust alone (module docstring),
    then load it back: a tokenizer that differs from `tokenizer` raises `MemberLoadError`.
    """
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(folder))
    _merges_as_strings(folder / "tokenizer.json")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    # what the replaced class fixed in code (step 1), and the named special tokens (step 2)
    config["padding_side"] = tokenizer.padding_side
    config["truncation_side"] = tokenizer.truncation_side
    config["model_input_names"] = list(tokenizer.model_input_names)
    named = _named_special_tokens(tokenizer)
    config["added_tokens_decoder"] = {
        str(i): token.__getstate__()
        for i, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.content in named
    }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    # as transformers loads the folder, and as members do (tokenizer_file.py)
    problem = _difference(tokenizer, AutoTokenizer.from_pretrained(str(folder)))
    problem = problem or _difference(tokenizer, load_tokenizer(str(folder)))
    if problem:
        raise MemberLoadError(
            f"Member {name!r}: its tokenizer written to {folder} loads back different ({problem}); "
            "please report this with the member's source."
        )


def _named_special_tokens(tokenizer: Any) -> set[str]:
    """The texts of the tokenizer's named special tokens (`bos_token`, ...) and of its extra
    special tokens.
    """
    named: set[str] = set()
    for value in tokenizer.special_tokens_map.values():
        named.update([value] if isinstance(value, str) else map(str, value))
    return named


def _merges_as_strings(path: Path) -> None:
    """BPE merges as `"a b"` strings (step 3), unless a piece holds a space or a line would
    start with `#version` (a header the legacy reader skips): then they stay pairs.
    """
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not isinstance(merges[0], list):
        return
    if any(" " in a or " " in b for a, b in merges):
        return
    joined = [f"{a} {b}" for a, b in merges]
    if any(line.startswith("#version") for line in joined):
        return
    model["merges"] = joined
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _difference(original: Any, loaded: Any) -> str:
    """What differs between two tokenizers ('' when nothing): class-level settings,
    special and added tokens, the vocabulary and the ids of probe texts.
    """
    for attribute in (
        "padding_side",
        "truncation_side",
        "model_input_names",
        "all_special_ids",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "chat_template",
    ):
        mine, theirs = getattr(original, attribute), getattr(loaded, attribute)
        if mine != theirs:
            return f"{attribute}: {mine!r} != {theirs!r}"
    added = {i: t.__getstate__() for i, t in original.added_tokens_decoder.items()}
    if added != {i: t.__getstate__() for i, t in loaded.added_tokens_decoder.items()}:
        return "added tokens"
    if original.get_vocab() != loaded.get_vocab():
        return "vocabulary"
    for text in _PROBES:
        for special in (True, False):
            ids = original(text, add_special_tokens=special).input_ids
            if ids != loaded(text, add_special_tokens=special).input_ids:
                return f"the ids of {text!r}"
            if original.decode(ids) != loaded.decode(ids):
                return f"the text of {ids}"
    return ""


def _write_marker(folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"format": FORMAT}) + "\n")


@contextmanager
def _read_once(path: Path) -> Iterator[None]:
    """Inside the block, the GGUF file at `path` is parsed once, however often it is read.

    transformers builds a new `gguf.GGUFReader` for the tokenizer, the config and the
    weights, and parsing the metadata (a 262k-entry vocabulary for Gemma-3) is most of a
    conversion's time; a reader is read-only once built, so one is shared. Measured on 2
    CPU cores: loading Gemma-3-270m's weights from its GGUF took 45 s of CPU with three
    parses, 13 s with one (the same weights).
    """
    import gguf as gguf_package

    original = gguf_package.GGUFReader
    target = os.path.realpath(path)
    shared: list[Any] = []

    def reader(file: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or os.path.realpath(file) != target:
            return original(file, *args, **kwargs)
        if not shared:
            shared.append(original(file))
        return shared[0]

    setattr(gguf_package, "GGUFReader", reader)  # noqa: B010 - transformers imports it per call
    try:
        yield
    finally:
        setattr(gguf_package, "GGUFReader", original)  # noqa: B010
