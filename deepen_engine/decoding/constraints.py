"""Output constraints: a JSON schema, a regular expression or a grammar turned into a mask
over the main member's vocabulary at every step (grammar-constrained decoding).

The grammar library is llguidance (the `constraints` extra), imported only when a
constraint is used. docs/constraints.md records why (measured against xgrammar).

How a constrained row decodes (`BatchDecoder.step` calls these in order):

1. `ConstraintSpec`: what a row asks for, as llguidance's grammar text (from
   `GenerationConfig.json_schema` / `regex` / `grammar`, or from the tools of a chat
   request, decoding/tools.py). Checked when the config is made: a grammar the library
   refuses raises `ConfigError` naming the field.
2. `RowConstraint(spec, vocab)`: one matcher per row, built when the row joins the batch
   and dropped with it. `vocab` is the main member's `ConstraintVocab`, built once per
   member: llguidance's tokenizer, and the ids whose bytes llguidance and the engine agree
   on (an id they disagree on is never allowed, so the grammar always sees the text the
   row really gets).
3. `apply_masks(fused, rows)`: the fused (B, V) logits with every token the row's grammar
   forbids at -inf, after fusion and before sampling (greedy and sampled alike). The main
   member's end tokens are allowed only where the grammar accepts its input as complete.
   llguidance writes each row's bitmask (V/8 bytes) in CPU memory; it crosses to the
   fused logits' device and is expanded there.
4. `RowConstraint.advance(token)` with each chosen token; `finished` is true once the
   grammar can take nothing more, and the row ends there (`"eos"`). A row that reaches
   `max_new_tokens` first ends with `"length"`, its structure incomplete.

Helpers are not constrained: they follow the main member's text, as always.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import GenerationConfig
from ..devices import DeviceCopies
from ..errors import ConfigError
from ..grammar import ConstraintSpec, check_constraint, llguidance
from ..members import Member

# (256, 8) bool: the bits of each byte, least significant first (llguidance's bit order).
_BYTE_BITS = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).bool()
_BITS_ON = DeviceCopies()  # _BYTE_BITS on the devices masks are applied on


def spec_from_config(config: GenerationConfig) -> ConstraintSpec | None:
    """The spec of the config's constraint field, or None when none is set."""
    given = config.constraint
    if given is None:
        return None
    try:
        return check_constraint(*given)
    except ValueError as exc:  # checked when the config was made; here only if changed
        raise ConfigError(
            f"GenerationConfig.{exc}", field=given[0], owner="GenerationConfig", reason=str(exc)
        ) from None


@dataclass
class ConstraintVocab:
    """A member's vocabulary as llguidance sees it, built once per member."""

    tokenizer: Any
    """llguidance's `LLTokenizer` (its EOS tokens: the member's end tokens)."""
    agreed: torch.Tensor
    """(V,) bool: ids allowed at all: llguidance's bytes for the id equal the engine's, or
    the id is an end token."""
    copies: DeviceCopies = field(default_factory=DeviceCopies)
    """`agreed` on the devices that masks are applied on."""

    @property
    def size(self) -> int:
        """Mask width: the member's logits width."""
        return int(self.agreed.shape[0])


_VOCABS: weakref.WeakKeyDictionary[Any, ConstraintVocab] = weakref.WeakKeyDictionary()


def constraint_vocab(member: Member) -> ConstraintVocab:
    """The member's `ConstraintVocab` (built on first use: about 0.5 s for a 49k
    vocabulary, 5 s for Gemma-3's 262k; cached for the member's lifetime).
    """
    cached = _VOCABS.get(member.model)
    if cached is not None:
        return cached
    lib = llguidance()
    size = len(member.vocab)
    eos = sorted(member.eos_ids)
    tokenizer = lib.hf.from_tokenizer(member.tokenizer, n_vocab=size, eos_token=eos or None)
    agreed = torch.zeros(size, dtype=torch.bool)
    for idx, text in enumerate(member.vocab.texts):
        if text is not None and tokenizer.decode_bytes([idx]) == text:
            agreed[idx] = True
    agreed[eos] = True
    vocab = ConstraintVocab(tokenizer=tokenizer, agreed=agreed)
    _VOCABS[member.model] = vocab
    return vocab


class RowConstraint:
    """One row's grammar state: a matcher advanced by every token the row chooses."""

    def __init__(self, spec: ConstraintSpec, vocab: ConstraintVocab) -> None:
        lib = llguidance()
        self.spec = spec
        self.vocab = vocab
        self.matcher = lib.LLMatcher(vocab.tokenizer, spec.grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(
                f"{spec.source} cannot be compiled for this vocabulary: {self.matcher.get_error()}",
                field=spec.source,
            )

    @property
    def finished(self) -> bool:
        """The grammar can take nothing more (only an end token could follow)."""
        return bool(self.matcher.is_stopped())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a (B, ceil(V/32)) int32 mask."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(
            target.data_ptr(), target.numel() * target.element_size()
        )

    def advance(self, token: int) -> None:
        """Feed the chosen token; a token outside the mask is a bug, not a user error."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(
                f"internal error: the grammar refused token {token} it had allowed "
                f"({self.matcher.get_error()})"
            )


def apply_masks(fused: torch.Tensor, constraints: list[RowConstraint | None]) -> torch.Tensor:
    """Fused (B, V) logits with the tokens each row's grammar forbids at -inf (rows
    without a constraint unchanged).
    """
    rows = [b for b, c in enumerate(constraints) if c is not None]
    if not rows:
        return fused
    width = fused.shape[1]
    words = (width + 31) // 32
    bitmask = torch.zeros((len(rows), words), dtype=torch.int32)  # (R, W)
    for r, b in enumerate(rows):
        constraint = constraints[b]
        assert constraint is not None
        constraint.fill(bitmask, r)
    device = fused.device
    bits = _BITS_ON.on(_BYTE_BITS, device)
    bytes_ = bitmask.to(device).view(torch.uint8).long()  # the mask crosses packed
    allowed = bits[bytes_].view(len(rows), -1)[:, :width]
    out = fused.clone()
    for r, b in enumerate(rows):
        constraint = constraints[b]
        assert constraint is not None
        agreed = constraint.vocab.copies.on(constraint.vocab.agreed, device)
        keep = allowed[r] & agreed[:width]  # (V,)
        out[b] = out[b].masked_fill(~keep, float("-inf"))
    return out
