"""The rows of the decoding loop: what is asked for (`NewRow`), what runs (`Row`), new rows
ready to join (`Prepared`), and the loop's hooks for measuring it (`DecodeHooks`,
`StepRecord`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..fusion import Fuser
from ..grammar import ConstraintSpec
from ..members import Member
from ..outputs import TokenLogprob, Usage
from ..remote.batch import new_batch
from .constraints import RowConstraint
from .member_batch import MemberBatch
from .prompts import MemberPrompt
from .sampling import position_uniform
from .text import TextAssembler


@dataclass
class StepRecord:
    """What one step saw, for `DecodeHooks.on_step`."""

    logits: list[torch.Tensor]
    """Per member run (B, V_i) next-token logits (only the main member's when the batch
    runs it alone); a helper in a Ray actor gives its top-k only (`TopLogits`)."""
    tokens: list[int]
    """The token chosen for each batch row."""
    rows: list[int]
    """The prompt position (`Row.index`) of each batch row."""
    weights: torch.Tensor | None = None
    """(B, N) each row's member weights when they come from its prompt
    (`weighting="prompt"`) and the rows share one fuser; else None (the fuser's own)."""


@dataclass
class DecodeHooks:
    """Variations of the loop for measuring it; the defaults are plain decoding."""

    helper_batch: Callable[[Member, list[list[int]]], MemberBatch] = new_batch
    """Builds each helper member's batch from its rows' prompt ids."""
    on_step: Callable[[StepRecord], None] | None = None
    """Called at each step once the tokens are chosen, before they are appended."""
    on_prefill: Callable[[Member, Sequence[Row], int, int], None] | None = None
    """Called as new rows are prefilled, after each chunk: the member, the rows, and the
    prompt positions that member has fed so far and in all."""


@dataclass
class NewRow:
    """A row asked for: its prompt for every member of the ensemble and its settings."""

    prompts: Sequence[MemberPrompt]  # one per ensemble member, in member order
    config: GenerationConfig
    fuser: Fuser
    index: int = 0  # position of the prompt in its request
    owner: object = None  # who asked (the scheduler's request); events are routed by it
    resume: Sequence[int] = ()  # main-member ids already generated (not streamed again)
    seed: int | None = None  # None: the config's seed, else a fresh random one
    constraint: ConstraintSpec | None = None
    """The row's output constraint; None: the config's (json_schema, regex, grammar)."""
    prompt_scores: dict[int, float | None] = field(default_factory=dict)
    """Bits per byte of the prompt by member index, when scored before the row joined
    (`main="auto"`, decoding/leaders.py)."""
    prefill: list[MemberBatch] | None = None
    """Every member's batch of this row alone, its prompt read while its leader was chosen
    (decoding/leaders.py): the decoder adopts them instead of prefilling again."""

    def drop_prefill(self) -> None:
        """Free the `prefill` batches (the row is prefilled again when it joins)."""
        for batch in self.prefill or []:
            batch.free()
        self.prefill = None


@dataclass
class Row:
    """A running row."""

    index: int
    config: GenerationConfig
    fuser: Fuser
    owner: object
    text: TextAssembler
    seed: int = 0  # its seed: a sampled token's number comes from it and its position
    usage: Usage = field(default_factory=Usage)
    generated: int = 0  # tokens chosen so far (resumed ids included)
    start: float = field(default_factory=time.perf_counter)
    constraint: RowConstraint | None = None  # the row's grammar state, if constrained
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not handed out yet
    prompt_scores: dict[int, float | None] = field(default_factory=dict)
    """Bits per byte of the prompt by ensemble member index (decoding/prompt_scores.py),
    when the row's fusion reads them."""

    def uniform(self, position: int) -> float:
        """The number that chooses the row's token at `position` when sampled (tokens
        generated before it; sampling.py): the same on every device and in every batch.
        """
        return position_uniform(self.seed, position)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The log-probabilities noted since the last event (None when not asked for)."""
        if self.config.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out


@dataclass
class Prepared:
    """New rows tokenised and checked for every member run: ready to join."""

    rows: list[Row]
    ids: list[list[list[int]]]  # [member run][row] prompt ids
    resume: list[Sequence[int]]
    scores: list[dict[int, float | None]] = field(default_factory=list)
    """Each row's prompt scores from before it joined (`main="auto"`), by member index."""

    prefill: list[list[MemberBatch] | None] = field(default_factory=list)
    """Each row's `NewRow.prefill` (None: the decoder prefills it)."""

    @classmethod
    def of(cls, rows: list[Row], ids: list[list[list[int]]], new: Sequence[NewRow]) -> Prepared:
        """The prepared `rows` (ids: [member run][row]) of the requested rows `new`, whose
        prefilled batches it takes over (`NewRow.prefill` is cleared).
        """
        prefill = [item.prefill for item in new]
        for item in new:
            item.prefill = None
        scores = [item.prompt_scores for item in new]
        return cls(rows, ids, [item.resume for item in new], scores, prefill)

    def subset(self, rows: list[int]) -> Prepared:
        """These rows only, in this order."""
        return Prepared(
            [self.rows[b] for b in rows],
            [[member_ids[b] for b in rows] for member_ids in self.ids],
            [self.resume[b] for b in rows],
            [self.scores[b] for b in rows] if self.scores else [],
            [self.prefill[b] for b in rows] if self.prefill else [],
        )

    def extend(self, more: Prepared) -> None:
        """Append another set of prepared rows (for the same member runs), to join as one."""
        self.rows.extend(more.rows)
        for ids, more_ids in zip(self.ids, more.ids):
            ids.extend(more_ids)
        self.resume.extend(more.resume)
        self.scores.extend(more.scores)
        self.prefill.extend(more.prefill)


def token_logprob(texts: Sequence[bytes | None], token: int, value: float) -> TokenLogprob:
    """A token's log-probability entry, its text from the vocabulary's bytes."""
    data = texts[token] or b""
    return TokenLogprob(
        token=data.decode("utf-8", errors="replace"), id=token, logprob=value, bytes=list(data)
    )


def note_logprob(
    row: Row, logp: torch.Tensor, token: int, texts: Sequence[bytes | None], eos: frozenset[int]
) -> None:
    """Note a chosen token's log-probability (and the row's top alternatives) from the
    (V,) log-probabilities it was chosen from; an end token is not text: not listed.
    """
    if token in eos:
        return
    top_k = row.config.logprobs or 0
    top = logp.topk(top_k) if top_k else None
    alternatives = (
        [token_logprob(texts, i, v) for v, i in zip(top.values.tolist(), top.indices.tolist())]
        if top
        else []
    )
    entry = token_logprob(texts, token, float(logp[token]))
    entry.top = alternatives
    row.logprobs.append(entry)


def logits_needed(rows: Sequence[Row], member: int) -> int | None:
    """The widest top-k of member `member`'s logits the rows' fusion reads; None: all of
    them (a fusion method that does not say reads all).
    """
    widest = 0
    for row in rows:
        ask = getattr(row.fuser, "logits_needed", None)
        need = ask(member) if ask is not None else None
        if need is None:
            return None
        widest = max(widest, need)
    return widest or None
