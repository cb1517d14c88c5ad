"""What a member is: `MemberSpec` (what the user asks for: a source, a name, a device, a
dtype) and `Member` (what is loaded: model, tokenizer, canonical vocabulary), plus the
names and identities of sources worked out without loading anything.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..alignment.vocabulary import CanonicalVocab
from ..errors import ConfigError
from .embedded import EMBEDDED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MemberSpec(BaseModel):
    """One ensemble member and where it runs.

    `source` is an embedded name (`smollm2-135m-instruct`, `gemma-3-270m`), a `.gguf`
    file, a local model folder, a Hugging Face hub id, or a ready `(model, tokenizer)`
    pair.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    source: Any
    name: str | None = None
    """Display name; default: the embedded name, the file or folder name, or the hub id."""
    device: str = "cpu"
    """Torch device of the member, e.g. `cpu`, `cuda:0`."""
    dtype: str = "float32"
    """Weights' dtype: `float32`, `bfloat16` or `float16`."""
    chat_template: str | None = None
    """Jinja chat template for this member, replacing its tokenizer's (see decoding/chat.py for the
    fallback when neither exists)."""

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        return value


@dataclass
class Member:
    """A loaded member: model, tokenizer and its canonical vocabulary."""

    name: str
    model: Any  # a transformers causal LM
    tokenizer: Any  # a fast transformers tokenizer
    vocab: CanonicalVocab
    device: torch.device
    dtype: torch.dtype
    source_kind: str  # "embedded", "gguf", "folder", "hub" or "object"
    load_seconds: float
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    cache_argument: str = "past_key_values"  # transformers >= 5.x names it `cache`
    chat_template: str | None = None

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def context_window(self) -> int | None:
        """Longest sequence the model was configured for, if it says."""
        return getattr(self.model.config, "max_position_embeddings", None)


def cache_dir() -> Path:
    """Where converted GGUF members are kept: `$DEEPEN_CACHE` or `~/.cache/deepen`."""
    if os.environ.get("DEEPEN_CACHE"):
        return Path(os.environ["DEEPEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepen"


def as_spec(item: Any) -> MemberSpec:
    """Turn what a user passes for one member into a `MemberSpec`."""
    if isinstance(item, MemberSpec):
        return item
    if isinstance(item, (str, Path, tuple)):
        return MemberSpec(source=item)
    if isinstance(item, dict):
        try:
            return MemberSpec(**item)
        except Exception as exc:
            raise ConfigError(f"Bad member settings {item!r}: {exc}") from None
    raise ConfigError(
        f"Cannot use {item!r} as a member: give a name, path or hub id (str), a "
        "(model, tokenizer) pair, or a MemberSpec."
    )


def display_name(member: Any) -> str:
    """The name a member will have once loaded, found without loading anything.

    `member` is anything `Ensemble` takes for one member: a `MemberSpec`, an embedded
    name, a path, a hub id or a `(model, tokenizer)` pair.
    """
    spec = as_spec(member)
    if spec.name:
        return spec.name
    source = spec.source
    if isinstance(source, tuple):
        return object_name(source[0]) if source else "(model, tokenizer) pair"
    text = str(source)
    if text in EMBEDDED:
        return text
    path = Path(text).expanduser()
    return path.name if path.exists() else text


def source_key(spec: MemberSpec) -> tuple[str, Any]:
    """What identifies a member's model, whatever its name, device or dtype: the same
    embedded name, the same file or folder (resolved), the same hub id, or the same model
    object.
    """
    source = spec.source
    if isinstance(source, tuple):
        return ("object", id(source[0]) if source else id(source))
    text = str(source)
    if text in EMBEDDED:
        return ("embedded", text)
    path = Path(text).expanduser()
    if path.exists():
        return ("path", str(path.resolve()))
    return ("hub", text)


def not_found_hint(text: str) -> str:
    """What to say when `text` names no embedded model, file or folder (the hub part is
    added by whoever tried the hub), with the embedded name it most likely meant.
    """
    close = near_embedded_name(text)
    guess = f" Did you mean {close!r}?" if close else ""
    return (
        f"Member {text!r} is not an embedded name ({', '.join(EMBEDDED)}) nor an existing "
        f"file or folder.{guess}"
    )


def near_embedded_name(text: str) -> str | None:
    """The embedded name `text` most likely means: the same letters and digits (case,
    dashes and a hub owner aside: `HuggingFaceTB/SmolLM2-135M-Instruct`), a start of one
    (`smollm2`), or a close spelling (`gemma-3-27m`).
    """

    def key(name: str) -> str:
        return "".join(ch for ch in name.rsplit("/", 1)[-1].lower() if ch.isalnum())

    wanted = key(text)
    if len(wanted) >= 4:
        for name in EMBEDDED:
            if key(name).startswith(wanted):
                return name
    close = difflib.get_close_matches(text.lower(), list(EMBEDDED), n=1)
    return close[0] if close else None


def object_name(model: Any) -> str:
    """A name for a ready model object: its folder name, else its class name."""
    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(path).name or type(model).__name__
