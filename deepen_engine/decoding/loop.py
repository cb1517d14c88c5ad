"""The decoding loop: a batch of prompts, every member in step, one fused token per row per
step.

`decode` is a generator (`Ensemble.generate` aggregates it, so streamed and non-streamed
text can never disagree) driving a `BatchDecoder` through its phases:

1. `prefill`: tokenise each prompt with each member's tokenizer (left-truncated to fit the
   member's context when `truncation="left"`) and prefill the members' caches.
2. `step`: fuse the members' next-token logits into the main member's vocabulary (all
   rows); choose each row's token (greedy or sampled; end tokens masked before
   `min_new_tokens`), where the main member's end tokens end a row; append it to the main
   member's ids and its bytes to the row's text, cut at stop strings; sync every helper to
   the new texts (a row that no longer fits some member's context window ends with
   `"length"`); return each row's text that is now final, and a final event for each
   finished row.
3. `advance`: drop finished rows; feed each member only its new positions, all rows in one
   forward pass (members on distinct devices concurrently).
4. `close`: free every member's cache, whether the batch finished or was abandoned.

`DecodeHooks` let tools vary the loop without copying it: the bench swaps in helpers that
re-encode their text each step (the reference implementation's way) and watches every
step's logits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..errors import ConfigError
from ..fusion import Fuser
from ..members import Member
from ..outputs import StreamEvent, Usage
from .member_batch import MemberBatch
from .sampling import Sampler, suppress_end_tokens
from .text import TextAssembler

MemberPrompt = tuple[str, bool]  # (prompt text, add the tokenizer's special tokens)


@dataclass
class StepRecord:
    """What one step saw, for `DecodeHooks.on_step`."""

    logits: list[torch.Tensor]
    """Per member (B, V_i) next-token logits (only the main member's when fusion is the
    identity, since the others are not run then)."""
    tokens: list[int]
    """The token chosen for each batch row."""
    rows: list[int]
    """The request row (prompt position) of each batch row."""


@dataclass
class DecodeHooks:
    """Variations of the loop for measuring it; the defaults are plain decoding."""

    helper_batch: Callable[[Member, list[list[int]]], MemberBatch] = MemberBatch
    """Builds each helper member's batch from its rows' prompt ids."""
    on_step: Callable[[StepRecord], None] | None = None
    """Called at each step once the tokens are chosen, before they are appended."""


@dataclass
class Row:
    """One prompt being decoded."""

    index: int  # position of the prompt in the request
    text: TextAssembler
    generator: torch.Generator  # the row's own random stream
    usage: Usage = field(default_factory=Usage)
    generated: int = 0  # tokens chosen so far (resumed ids included)


def decode(
    members: Sequence[Member],
    fuser: Fuser,
    prompts: Sequence[Sequence[MemberPrompt]],
    config: GenerationConfig,
    *,
    hooks: DecodeHooks | None = None,
    resume: Sequence[Sequence[int]] | None = None,
) -> Iterator[StreamEvent]:
    """Generate for a batch of rows, yielding text deltas and one final event per row.

    prompts[b][i] is row b's prompt for member i: (text, add_special_tokens). A plain
    prompt is the same text for all members, tokenised with the member's special tokens
    (e.g. BOS); a chat prompt is each member's own rendering, already holding them.
    `resume[b]`: main-member ids row b has already generated; they are prefilled (their
    text is not streamed again) and count toward `max_new_tokens` and `min_new_tokens`.
    """
    decoder = BatchDecoder(members, fuser, config, hooks or DecodeHooks())
    try:
        decoder.prefill(prompts, resume)
        while True:
            yield from decoder.step()
            if not decoder.rows:
                return
            decoder.advance()
    finally:
        decoder.close()


class BatchDecoder:
    """The rows of one batch and every member's state for them (see the module docstring
    for the phases).
    """

    def __init__(
        self,
        members: Sequence[Member],
        fuser: Fuser,
        config: GenerationConfig,
        hooks: DecodeHooks,
    ) -> None:
        self.start = time.perf_counter()
        self.fuser, self.config, self.hooks = fuser, config, hooks
        self.main = fuser.main
        # With identity fusion (eta 0, steps 0, a single member or all weight on the main
        # member) the other members cannot change the result: they are not run at all.
        self.identity = fuser.is_identity
        self.members = [members[self.main]] if self.identity else list(members)
        self.member_index = [self.main] if self.identity else list(range(len(members)))
        if self.identity:
            self.main = 0
        self.main_member = self.members[self.main]
        self.rows: list[Row] = []  # the active rows, in batch order
        self.batches: list[MemberBatch] = []
        self.sampler = Sampler(config.temperature, config.top_k, config.top_p)
        self.eos = torch.tensor(sorted(self.main_member.eos_ids), dtype=torch.long)
        self.other_seconds = 0.0  # fusion, sampling, sync: everything but forwards
        self._keep: list[int] = []  # batch rows still active after the last step
        parallel = len({str(m.device) for m in self.members}) == len(self.members) > 1
        self.pool = ThreadPoolExecutor(max_workers=len(self.members)) if parallel else None

    def prefill(
        self,
        prompts: Sequence[Sequence[MemberPrompt]],
        resume: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Tokenise and check every row for every member, then fill the caches."""
        cfg = self.config
        if cfg.seed is None:
            seeds = [random.getrandbits(63) for _ in prompts]
        else:  # every row its own stream, the same for the same seed in any batch position
            seeds = [cfg.seed] * len(prompts)
        self.rows = [
            Row(index=b, text=TextAssembler(cfg.stop), generator=_generator(seeds[b]))
            for b in range(len(prompts))
        ]
        # all rows checked for every member before any cache exists
        member_ids = [
            self._prompt_ids(m, [row[j] for row in prompts])
            for m, j in zip(self.members, self.member_index)
        ]
        self.batches = [
            MemberBatch(m, ids) if i == self.main else self.hooks.helper_batch(m, ids)
            for i, (m, ids) in enumerate(zip(self.members, member_ids))
        ]
        for b, ids in enumerate(resume or []):
            self._resume(b, list(ids))
        self._forward_all()

    def _prompt_ids(self, member: Member, prompts: list[MemberPrompt]) -> list[list[int]]:
        ids = [member.tokenizer(text, add_special_tokens=add).input_ids for text, add in prompts]
        for b, row_ids in enumerate(ids):
            if not row_ids:
                raise ConfigError(
                    f"Prompt {b} ({prompts[b][0]!r}) is empty in member {member.name!r}'s "
                    "tokens; give some text."
                )
            ids[b] = _fit_context(row_ids, member, b, self.config)
            self.rows[b].usage.prompt_tokens[member.name] = len(ids[b])
        return ids

    def _resume(self, b: int, ids: list[int]) -> None:
        """Row b continues after main-member ids it already generated."""
        row, texts = self.rows[b], self.main_member.vocab.texts
        for token in ids:
            self.batches[self.main].append(b, token)
            row.text.add(texts[token] or b"")
        row.text.delta()  # already handed out: not streamed again
        row.generated = len(ids)
        for i, batch in enumerate(self.batches):
            if i != self.main:
                batch.sync_text(b, row.text.text)

    def step(self) -> list[StreamEvent]:
        """Choose every row's next token; the events it makes final."""
        t0 = time.perf_counter()
        cfg, rows = self.config, self.rows
        # fuse the next-token distributions into the main vocabulary.
        logits = [batch.require_logits() for batch in self.batches]  # per member (B, V_i)
        fused = logits[self.main] if self.identity else self.fuser.fuse(logits)  # (B, V)
        # choose each row's token; no end token before min_new_tokens.
        early = torch.tensor([r.generated < cfg.min_new_tokens for r in rows])
        fused = suppress_end_tokens(fused, self.eos, early)
        tokens = self.sampler(fused, [r.generator for r in rows])
        if self.hooks.on_step is not None:
            self.hooks.on_step(StepRecord(logits, tokens, [r.index for r in rows]))
        finished = self._append(tokens)
        self._sync(finished)
        self.other_seconds += time.perf_counter() - t0
        # hand out what is final, and finish rows.
        events: list[StreamEvent] = []
        for b, row in enumerate(rows):
            if b in finished:
                events.extend(self._finish(b, finished[b]))
            elif delta := row.text.delta():
                events.append(StreamEvent(delta=delta, index=row.index))
        self.rows = [row for b, row in enumerate(rows) if b not in finished]
        self._keep = [b for b in range(len(rows)) if b not in finished]
        return events

    def _append(self, tokens: list[int]) -> dict[int, str]:
        """Append each row's token to the main member and its text; {batch row: reason}
        for the rows that end.
        """
        finished: dict[int, str] = {}
        main_batch, texts = self.batches[self.main], self.main_member.vocab.texts
        for b, (row, token) in enumerate(zip(self.rows, tokens)):
            row.generated += 1
            row.usage.completion_tokens += 1
            if token in self.main_member.eos_ids:
                finished[b] = "eos"
                continue
            main_batch.append(b, token)
            row.text.add(texts[token] or b"")
            if row.text.stopped:
                finished[b] = "stop"
            elif row.generated >= self.config.max_new_tokens:
                finished[b] = "length"
        return finished

    def _sync(self, finished: dict[int, str]) -> None:
        """Helpers follow the texts; a row whose next feed would pass some member's
        context window ends here (its last token is chosen, it just cannot be fed).
        """
        for i, batch in enumerate(self.batches):
            for b, row in enumerate(self.rows):
                if b in finished:
                    continue
                if i != self.main:
                    batch.sync_text(b, row.text.text)
                if not batch.fits(b):
                    finished[b] = "length"

    def advance(self) -> None:
        """Drop finished rows and feed every member the positions its cache lacks."""
        t0 = time.perf_counter()
        for batch in self.batches:
            batch.keep_rows(self._keep)
        self.other_seconds += time.perf_counter() - t0
        self._forward_all()

    def _finish(self, b: int, reason: str) -> Iterator[StreamEvent]:
        row = self.rows[b]
        if reason != "stop":
            row.text.finish()
            if row.text.stopped:
                reason = "stop"
        if delta := row.text.delta(final=True):
            yield StreamEvent(delta=delta, index=row.index)
        usage = row.usage
        for batch in self.batches:
            name = batch.member.name
            usage.fed_positions[name] = batch.rows[b].fed_positions
            usage.forward_seconds[name] = batch.forward_seconds
        usage.fusion_seconds = self.other_seconds
        usage.total_seconds = time.perf_counter() - self.start
        token_ids = list(self.batches[self.main].rows[b].generated_ids)
        yield StreamEvent(index=row.index, finish_reason=reason, usage=usage, token_ids=token_ids)

    def _forward_all(self) -> None:
        """Feed every member; members on distinct devices run concurrently (torch releases
        the GIL in its kernels), so a step waits only for the slowest member.
        """
        if self.pool is None:
            for batch in self.batches:
                batch.forward()
            return
        for future in [self.pool.submit(batch.forward) for batch in self.batches]:
            future.result()

    def close(self) -> None:
        """Free every member's cache and the worker threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for batch in self.batches:
            batch.free()
        self.rows = []


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def _fit_context(ids: list[int], member: Member, row: int, config: GenerationConfig) -> list[int]:
    """A row's prompt ids for one member, checked against (or cut to) its context window.

    `truncation="error"`: a prompt that fills the window raises `ConfigError`. `"left"`:
    the oldest ids are dropped so that prompt + `max_new_tokens` fits; a leading BOS token
    is kept, since models trained with one behave badly without it.
    """
    window = member.context_window
    if window is None:
        return ids
    if config.truncation == "error":
        if len(ids) >= window:
            raise ConfigError(
                f"Prompt {row} is {len(ids)} tokens long in member {member.name!r}, whose "
                f"context holds {window}; shorten the prompt, or pass truncation='left' to "
                "drop its oldest tokens."
            )
        return ids
    room = window - config.max_new_tokens
    if len(ids) <= room:
        return ids
    bos = member.tokenizer.bos_token_id
    head = ids[:1] if bos is not None and ids[0] == bos else []
    if room <= len(head):
        raise ConfigError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for prompt {row} in "
            f"member {member.name!r}, whose context holds {window}; lower max_new_tokens "
            f"below {window - len(head)}."
        )
    return head + ids[len(ids) - (room - len(head)) :]
