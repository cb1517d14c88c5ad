"""Canonical token text and anchors.

Every token id of a member is mapped to the bytes it really stands for, whatever the
tokenizer's internal spelling:

- byte-level BPE (GPT-2, Llama-3, SmolLM2): each symbol is one byte through GPT-2's
  byte-to-unicode table (`Ġ` is a space, `Ċ` a newline);
- SentencePiece-style (Gemma, Llama-2): `▁` is a space, byte-fallback pieces `<0x0A>` are
  that byte.

Special and control tokens (bos, eos, pad, chat markers, unused slots) have no text and
never become anchors. The anchors of an ensemble are the byte strings every member has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..errors import AlignmentError, MemberLoadError
from .token_texts import TokenTexts

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_level_decoding() -> dict[str, int]:
    """GPT-2's table from printable unicode symbols back to the bytes they stand for.

    Bytes that print as themselves keep their code point; the others (controls, space,
    0x7F-0xA0, 0xAD) are moved to code points 256 and up, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def tokenizer_kind(tokenizer: Any) -> tuple[str, bool]:
    """("byte_level" | "sentencepiece", byte_fallback) from the tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MemberLoadError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; deepen reads token text from "
            "the Rust tokenizer (AutoTokenizer.from_pretrained gives one)."
        )
    # The decoder and the model's byte_fallback flag only: serialising the whole tokenizer
    # (`to_str()`, 33 MB of JSON for Gemma-3's 262k tokens and 515k merges) and parsing it
    # into Python objects cost about 150 MB of peak memory on every load.
    decoder = backend.decoder
    decoders = _flatten(json.loads(decoder.__getstate__()) if decoder is not None else None)
    types = {d.get("type") for d in decoders}
    byte_fallback = _model_byte_fallback(backend.model) or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte_level", False
    sp_replace = any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁" for d in decoders
    )
    if "Metaspace" in types or sp_replace:
        return "sentencepiece", byte_fallback
    raise MemberLoadError(
        f"Unsupported tokenizer decoder {sorted(t for t in types if t)}: deepen reads "
        "byte-level BPE and SentencePiece-style (▁) vocabularies."
    )


def _model_byte_fallback(model: Any) -> bool:
    """The model's `byte_fallback` flag; BPE has it as an attribute, other models (Unigram)
    only in their JSON, which is read then (the model alone, not the whole tokenizer).
    """
    flag = getattr(model, "byte_fallback", None)
    if flag is None:
        flag = json.loads(model.__getstate__()).get("byte_fallback")
    return bool(flag)


def _flatten(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _flatten(sub)]
    return [decoder]


@dataclass
class CanonicalVocab:
    """The text of every token id of one member (`None` for special tokens)."""

    kind: str
    # index = token id; length = the model's embedding rows; a list given is stored as
    # `TokenTexts` (11 MB less for Gemma-3's 262k tokens: token_texts.py)
    texts: Sequence[bytes | None]
    byte_fallback_ids: frozenset[int]

    def __post_init__(self) -> None:
        if not isinstance(self.texts, TokenTexts):
            self.texts = TokenTexts(self.texts)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, size: int, member: str = "") -> CanonicalVocab:
        """Canonical bytes for ids `0..size-1` (`size`: the model's embedding rows)."""
        try:
            kind, byte_fallback = tokenizer_kind(tokenizer)
        except MemberLoadError as exc:
            raise MemberLoadError(f"Member {member!r}: {exc}") from None
        fallback: set[int] = set()
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(getattr(tokenizer, "all_special_ids", []))
        # The model's pieces id by id: a {piece: id} dict of the whole vocabulary
        # (`get_vocab()`) would hold 262k more strings at once for Gemma-3 (about 38 MB).
        model = tokenizer.backend_tokenizer.model
        table = byte_level_decoding()

        def text(idx: int) -> bytes | None:
            token = added.get(idx)
            if token is not None:
                # Added non-special tokens are literal text (e.g. Gemma's "\n\n\n" or HTML
                # tags); added special tokens have none.
                if token.special:
                    return None
                data = tokenizer.decode([idx], skip_special_tokens=False).encode("utf-8")
            else:
                piece = model.id_to_token(idx)
                if piece is None:  # no piece: no text
                    return None
                if kind == "byte_level":
                    try:
                        data = bytes(table[ch] for ch in piece)
                    except KeyError:  # not a byte-level symbol: a literal piece
                        data = piece.encode("utf-8")
                elif (m := _BYTE_PIECE.fullmatch(piece)) and byte_fallback:
                    data = bytes([int(m.group(1), 16)])
                    fallback.add(idx)
                else:
                    data = piece.replace("▁", " ").encode("utf-8")
            # special tokens have no text, nor has an empty string
            return None if idx in special or not data else data

        # one text at a time into the compact store: no list of 262k objects at once
        texts = TokenTexts(text(idx) for idx in range(size))
        return cls(kind=kind, texts=texts, byte_fallback_ids=frozenset(fallback))

    def __len__(self) -> int:
        return len(self.texts)

    def text_to_id(self) -> dict[bytes, int]:
        """One id per text: a regular piece before a byte-fallback one, then the lowest id."""
        out: dict[bytes, int] = {}
        for idx, text in enumerate(self.texts):
            if text is None:
                continue
            held = out.get(text)
            fallback = self.byte_fallback_ids
            if held is None or (held in fallback and idx not in fallback):
                out[text] = idx
        return out


@dataclass
class Anchors:
    """The texts all members share, and each member's token ids for them."""

    texts: list[bytes]  # anchor index -> text, sorted
    token_ids: list[torch.Tensor]  # per member: (A,) long, its token id for each anchor
    token_to_anchor: list[torch.Tensor]  # per member: (V,) long, anchor index or -1

    def __len__(self) -> int:
        return len(self.texts)


def find_anchors(
    vocabs: Sequence[CanonicalVocab], names: Sequence[str], min_anchors: int
) -> Anchors:
    """Anchors of the members; `AlignmentError` if any two share fewer than `min_anchors`."""
    maps = [v.text_to_id() for v in vocabs]
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            shared = len(maps[i].keys() & maps[j].keys())
            if shared < min_anchors:
                raise AlignmentError(
                    f"Members {names[i]!r} and {names[j]!r} share {shared} token texts, fewer "
                    f"than min_anchors={min_anchors}; their vocabularies are too different to "
                    "fuse (lower FusionConfig.min_anchors only if you know why)."
                )
    common = set(maps[0])
    for m in maps[1:]:
        common &= m.keys()
    texts = sorted(common)
    if len(texts) < min_anchors:
        raise AlignmentError(
            f"Members {list(names)} share {len(texts)} token texts in all, fewer than "
            f"min_anchors={min_anchors}."
        )
    index = {t: a for a, t in enumerate(texts)}
    token_ids, token_to_anchor = [], []
    for vocab, m in zip(vocabs, maps):
        token_ids.append(torch.tensor([m[t] for t in texts], dtype=torch.long))
        # Every id whose text is an anchor maps to it, duplicates (byte-fallback) included.
        to_anchor = torch.tensor([index.get(t, -1) if t else -1 for t in vocab.texts])
        token_to_anchor.append(to_anchor.long())
    return Anchors(texts=texts, token_ids=token_ids, token_to_anchor=token_to_anchor)
