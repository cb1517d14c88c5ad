"""The decoding loop: a batch of prompts, every member in step, one fused token per row per
step.

Steps of `decode` (a generator; `Ensemble.generate` aggregates it, so streamed and
non-streamed text can never disagree):

1. Tokenise each prompt with each member's tokenizer (left-truncated to fit the member's
   context when `truncation="left"`) and prefill the members' caches.
2. Fuse the members' next-token logits into the main member's vocabulary (all rows).
3. Choose each row's token (greedy or sampled); the main member's end tokens end a row.
4. Append it to the main member's ids and its bytes to the row's text; cut at stop strings.
   Sync every helper to the new texts; a row that no longer fits some member's context
   window ends with `"length"`.
5. Yield each row's text that is now final; yield a final event for each finished row.
6. Drop finished rows; feed each member only its new positions, all rows in one forward
   pass (members on distinct devices concurrently).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .errors import ConfigError
from .fusion import Fuser
from .members import Member
from .sampling import Sampler
from .sync import MemberBatch
from .text import TextAssembler

MemberPrompt = tuple[str, bool]  # (prompt text, add the tokenizer's special tokens)


@dataclass
class Usage:
    """Token counts of one row, and the time spent by the batch it ran in."""

    completion_tokens: int = 0
    """Tokens the main member generated (an end-of-sequence token included)."""
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    """Prompt length in each member's own tokens, by member name."""
    fed_positions: dict[str, int] = field(default_factory=dict)
    """Positions each member fed after its prompt (the sync cost; ~1 per token is ideal)."""
    forward_seconds: dict[str, float] = field(default_factory=dict)
    """Time in each member's forward passes (prefill included), for the whole batch."""
    fusion_seconds: float = 0.0
    """Time in fusion, sampling and sync (everything but forwards), for the whole batch."""
    total_seconds: float = 0.0
    """Wall time from the start of the batch to this row's end."""

    def token_counts(self, main: str) -> dict[str, int]:
        """OpenAI-style counts: `prompt_tokens` (in the main member's tokens, the
        vocabulary the answer is written in), `completion_tokens` and `total_tokens`.
        """
        prompt = int(self.prompt_tokens.get(main, 0))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


@dataclass
class StreamEvent:
    """One streamed piece of row `index`: a text delta, or its final event."""

    delta: str = ""
    index: int = 0
    """The row (position of the prompt in the request)."""
    finish_reason: str | None = None
    """`"eos"`, `"length"` or `"stop"` on the row's final event, else None."""
    usage: Usage | None = None
    token_ids: list[int] | None = None
    """The main member's generated ids, on the final event."""


@dataclass
class GenerationResult:
    """A finished row."""

    text: str
    finish_reason: str
    token_ids: list[int]
    usage: Usage


def decode(
    members: Sequence[Member],
    fuser: Fuser,
    prompts: Sequence[Sequence[MemberPrompt]],
    config: GenerationConfig,
) -> Iterator[StreamEvent]:
    """Generate for a batch of rows, yielding text deltas and one final event per row.

    prompts[b][i] is row b's prompt for member i: (text, add_special_tokens). A plain
    prompt is the same text for all members, tokenised with the member's special tokens
    (e.g. BOS); a chat prompt is each member's own rendering, already holding them.
    """
    start = time.perf_counter()
    main = fuser.main
    # With identity fusion (eta 0, steps 0, a single member or all weight on the main
    # member) the other members cannot change the result: they are not run at all.
    identity = fuser.is_identity
    if identity:
        members = [members[main]]
        prompts = [[row[main]] for row in prompts]
        main = 0
    n_rows = len(prompts)
    usages = [Usage() for _ in range(n_rows)]
    # 1. each member's own prompt ids (all checked before any cache exists), then
    # prefilled into its KV cache.
    member_ids: list[list[list[int]]] = []  # [member][row] ids
    for i, m in enumerate(members):
        ids = [m.tokenizer(row[i][0], add_special_tokens=row[i][1]).input_ids for row in prompts]
        for b, row_ids in enumerate(ids):
            if not row_ids:
                raise ConfigError(
                    f"Prompt {b} ({prompts[b][i][0]!r}) is empty in member {m.name!r}'s "
                    "tokens; give some text."
                )
            ids[b] = _fit_context(row_ids, m, b, config)
            usages[b].prompt_tokens[m.name] = len(ids[b])
        member_ids.append(ids)
    batches = [MemberBatch(m, ids) for m, ids in zip(members, member_ids)]
    main_batch, main_member = batches[main], members[main]
    if config.seed is None:
        seeds = [random.getrandbits(63) for _ in range(n_rows)]
    else:  # every row its own stream, the same for the same seed in any batch position
        seeds = [config.seed] * n_rows
    sampler = Sampler(config.temperature, config.top_k, config.top_p, seeds)
    texts = [TextAssembler(config.stop) for _ in range(n_rows)]
    active = list(range(n_rows))  # request row index of each batch row
    eos = torch.tensor(sorted(main_member.eos_ids), dtype=torch.long)
    other_seconds = 0.0
    parallel = len({str(m.device) for m in members}) == len(members) > 1
    pool = ThreadPoolExecutor(max_workers=len(members)) if parallel else None
    try:
        _forward_all(batches, pool)
        for step in range(config.max_new_tokens):
            t0 = time.perf_counter()
            # 2. fuse the next-token distributions into the main vocabulary.
            logits = [batch.logits for batch in batches]  # per member (B, V_i)
            fused = logits[main] if identity else fuser.fuse(logits)  # (B, V_main)
            if step < config.min_new_tokens and eos.numel():
                fused = fused.index_fill(1, eos, float("-inf"))  # no end before the minimum
            # 3. choose each row's token.
            tokens = sampler(fused, active)
            finished: dict[int, str] = {}
            for b, (row, token) in enumerate(zip(active, tokens)):
                usages[row].completion_tokens += 1
                if token in main_member.eos_ids:
                    finished[b] = "eos"
                    continue
                # 4. append to the main member and to the row's text.
                main_batch.append(b, token)
                texts[row].add(main_member.vocab.texts[token] or b"")
                if texts[row].stopped:
                    finished[b] = "stop"
                elif step == config.max_new_tokens - 1:
                    finished[b] = "length"
            # 4b. helpers follow the texts; a row whose next feed would pass some member's
            # context window ends here (its last token is chosen, it just cannot be fed).
            for i, batch in enumerate(batches):
                for b, row in enumerate(active):
                    if b in finished:
                        continue
                    if i != main:
                        batch.sync_text(b, texts[row].text)
                    if not batch.fits(b):
                        finished[b] = "length"
            other_seconds += time.perf_counter() - t0
            # 5. hand out what is final, and finish rows.
            for b, row in enumerate(active):
                if b in finished:
                    ids = main_batch.rows[b].generated_ids
                    usage = usages[row]
                    usage.fusion_seconds = other_seconds
                    yield from _finish(row, finished[b], texts[row], ids, usage, batches, b, start)
                else:
                    delta = texts[row].delta()
                    if delta:
                        yield StreamEvent(delta=delta, index=row)
            if len(finished) == len(active):
                break
            t0 = time.perf_counter()
            # 6. drop finished rows, feed new positions.
            keep = [b for b in range(len(active)) if b not in finished]
            active = [active[b] for b in keep]
            for batch in batches:
                batch.keep_rows(keep)
            other_seconds += time.perf_counter() - t0
            _forward_all(batches, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        for batch in batches:
            batch.free()


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


def _forward_all(batches: list[MemberBatch], pool: ThreadPoolExecutor | None) -> None:
    """Feed every member; members on distinct devices run concurrently (torch releases
    the GIL in its kernels), so a step waits only for the slowest member.
    """
    if pool is None:
        for batch in batches:
            batch.forward()
        return
    for future in [pool.submit(batch.forward) for batch in batches]:
        future.result()


def _finish(
    row: int,
    reason: str,
    text: TextAssembler,
    token_ids: list[int],
    usage: Usage,
    batches: list[MemberBatch],
    b: int,
    start: float,
) -> Iterator[StreamEvent]:
    if reason != "stop":
        text.finish()
        if text.stopped:
            reason = "stop"
    delta = text.delta(final=True)
    if delta:
        yield StreamEvent(delta=delta, index=row)
    for batch in batches:
        name = batch.member.name
        usage.fed_positions[name] = batch.rows[b].fed_positions
        usage.forward_seconds[name] = batch.forward_seconds
    usage.total_seconds = time.perf_counter() - start
    yield StreamEvent(index=row, finish_reason=reason, usage=usage, token_ids=list(token_ids))


def collect(events: Iterator[StreamEvent], n_rows: int) -> list[GenerationResult]:
    """Aggregate a stream of `n_rows` rows into one result per row, in row order."""
    parts: list[list[str]] = [[] for _ in range(n_rows)]
    results: list[GenerationResult | None] = [None] * n_rows
    for event in events:
        parts[event.index].append(event.delta)
        if event.finish_reason is not None:
            assert event.usage is not None and event.token_ids is not None
            results[event.index] = GenerationResult(
                text="".join(parts[event.index]),
                finish_reason=event.finish_reason,
                token_ids=event.token_ids,
                usage=event.usage,
            )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"the decoding stream ended without final events for rows {missing}")
    return [r for r in results if r is not None]
