"""The decoding loop: rows of prompts, every member in step, one fused token per row per
step.

A `BatchDecoder` holds the running rows and every member's batched state for them. Rows
carry their own settings (generation config, fuser), so rows of different requests share
the members' forward passes; they can join and leave between steps. Its phases:

1. `prepare`: tokenise new rows with each member's tokenizer (left-truncated to fit the
   member's context when `truncation="left"`); a bad row raises before anything changes.
2. `join`: prefill the new rows (one forward per member for all of them) and merge them
   into the running batches.
3. `step`: fuse the members' next-token logits into the main member's vocabulary (each
   row with its own fuser); mask what each constrained row's grammar forbids
   (`constraints.py`); choose each row's token (its own sampling settings and seeded
   numbers; end tokens masked before `min_new_tokens`), where the main member's end tokens
   end a row, and so does a grammar that can take nothing more; append it to the main
   member's ids and its bytes to the row's text, cut at stop strings; sync every helper
   to the new texts (a row that no longer fits some member's context window ends with
   `"length"`); return each row's text that is now final and a final event for each
   finished row, and drop the finished rows.
4. `advance`: feed each member only its new positions, all rows in one forward pass
   (members on distinct devices, or in their own Ray actors, concurrently).
5. `remove` drops rows whose reader left; `close` frees every cache.

`decode.py` drives one batch of rows to the end; `deepen_engine/scheduler.py` drives a
long-lived decoder that requests join and leave. `DecodeHooks` let tools vary the loop
without copying it: the bench swaps in helpers that re-encode their text each step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from ..members import Member
from ..outputs import StreamEvent
from ..remote.batch import new_batch
from .constraints import RowConstraint, apply_masks, constraint_vocab, spec_from_config
from .drafts import settle_speculation
from .leaders import adopt
from .member_batch import PREFILL_CHUNK, MemberBatch
from .prompts import fit_context
from .row_scores import fuse_rows, note_scores, start_scoring, step_weights
from .rows import DecodeHooks, NewRow, Prepared, Row, StepRecord, logits_needed, note_logprob
from .sampling import Sampler, shares_memory, suppress_end_tokens
from .speculative import Speculator
from .text import TextAssembler


class BatchDecoder:
    """The running rows and every member's state for them (see the module docstring).
    All rows share one main member. `run_helpers=False` runs the main member alone (rows
    whose fusion is the identity: the other members could not change them).
    """

    def __init__(
        self,
        members: Sequence[Member],
        main: int,
        run_helpers: bool = True,
        hooks: DecodeHooks | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        speculate_max_rows: int = 0,  # `SchedulerConfig.speculate_max_rows`
        draft_precision: str = "auto",  # `SchedulerConfig.draft_precision`
    ) -> None:
        self.hooks = hooks or DecodeHooks()
        self.prefill_chunk = prefill_chunk  # positions per forward pass in a long prefill
        self.member_count = len(members)  # the ensemble's (`GenerationConfig.drafter`)
        self.member_index = list(range(len(members))) if run_helpers else [main]
        self.members = [members[i] for i in self.member_index]
        self.main = self.member_index.index(main)  # position among the members run
        self.main_member = self.members[self.main]
        self.rows: list[Row] = []  # the running rows, in batch order
        self.batches = [self._batch(i, []) for i in range(len(self.members))]
        # in parallel only when no two members share a device (a sharded member has several;
        # a Ray actor counts as a device of its own)
        places = [{m.name} if m.remote else m.devices for m in self.members]
        parallel = len(self.members) > 1 and len(set().union(*places)) == sum(map(len, places))
        self.pool = ThreadPoolExecutor(max_workers=len(self.members)) if parallel else None
        # `GenerationConfig.speculate`
        self.speculator = Speculator(self, speculate_max_rows, draft_precision)

    def _batch(self, i: int, ids: list[list[int]]) -> MemberBatch:
        """A batch of the i-th member run (helpers through `DecodeHooks.helper_batch`)."""
        make = new_batch if i == self.main else self.hooks.helper_batch
        batch = make(self.members[i], ids)
        batch.chunk = self.prefill_chunk
        return batch

    # --- rows in ------------------------------------------------------------------------

    def prepare(self, new: Sequence[NewRow]) -> Prepared:
        """Tokenise and check new rows for every member run; raises `ConfigError` naming
        the first bad row, before anything changes.
        """
        settle_speculation(self.members, new, self.member_count)
        rows = []
        for item in new:
            seed = item.seed if item.seed is not None else item.config.seed
            if seed is None:
                seed = random.getrandbits(63)
            rows.append(
                Row(
                    index=item.index,
                    config=item.config,
                    fuser=item.fuser,
                    owner=item.owner,
                    text=TextAssembler(item.config.stop),
                    seed=seed,
                    constraint=self._constraint(item),
                )
            )
        ids = []
        for member, i in zip(self.members, self.member_index):
            member_ids = []
            for row, item in zip(rows, new):
                text, special = item.prompts[i]
                row_ids = fit_context(
                    member.tokenizer(text, add_special_tokens=special).input_ids,
                    text,
                    member,
                    row.index,
                    row.config,
                )
                row.usage.prompt_tokens[member.name] = len(row_ids)
                member_ids.append(row_ids)
            ids.append(member_ids)
        return Prepared.of(rows, ids, new)

    def _constraint(self, item: NewRow) -> RowConstraint | None:
        """The new row's grammar state over the main member's vocabulary, if constrained."""
        spec = item.constraint or spec_from_config(item.config)
        if spec is None:
            return None
        return RowConstraint(spec, constraint_vocab(self.main_member))

    def join(self, prepared: Prepared) -> None:
        """Prefill the prepared rows and add them to the running batch (rows whose every
        member read the prompt already, `NewRow.prefill`, join with those caches).
        """
        helpers = self.hooks.helper_batch  # (decoding/leaders.py)
        adopted, held, prepared = adopt(prepared, self.member_index, helpers, self.prefill_chunk)
        if adopted.rows:
            self._add(adopted, held)
        if not prepared.rows:
            return
        fresh = [self._batch(i, ids) for i, ids in enumerate(prepared.ids)]
        try:
            start_scoring(fresh, self.members, prepared)  # if their fusion reads scores
            for b, ids in enumerate(prepared.resume):
                if ids:
                    self._resume(fresh, prepared.rows[b], b, list(ids))
            self._forward(fresh, prepared.rows, self.hooks.on_prefill)
        except BaseException:
            for batch in fresh:
                batch.free()
            raise
        self._add(prepared, fresh)

    def _add(self, prepared: Prepared, fresh: list[MemberBatch]) -> None:
        """Prefilled rows (their batches `fresh`, per member run) join the running batch."""
        note_scores(prepared, fresh, self.member_index)
        for batch, new in zip(self.batches, fresh):
            batch.merge(new)
        self.rows.extend(prepared.rows)

    def _resume(self, fresh: list[MemberBatch], row: Row, b: int, ids: list[int]) -> None:
        """Row b of the fresh batches continues after main-member ids it generated."""
        texts = self.main_member.vocab.texts
        for token in ids:
            fresh[self.main].append(b, token)
            row.text.add(texts[token] or b"")
            if row.constraint is not None:  # the grammar resumes where the row was
                row.constraint.advance(token)
        row.text.delta()  # already handed out: not streamed again
        row.generated = len(ids)
        for i, batch in enumerate(fresh):
            if i != self.main:
                batch.sync_text(b, row.text.text)

    # --- one step -----------------------------------------------------------------------

    def step(self) -> list[tuple[Row, StreamEvent]]:
        """Choose every row's next token; the events that makes final, by row. Finished
        rows leave the batch.
        """
        if self.speculator.wanted():  # some row drafts: decoding/speculative.py
            return self.speculator.step()
        self.speculator.catch_up()  # helpers' ids left for a speculative step that is not
        t0 = time.perf_counter()
        rows = self.rows
        # fuse the next-token distributions into the main vocabulary, row by row settings.
        logits = [batch.require_logits() for batch in self.batches]  # per member (B, V_i)
        fused = self._fuse(logits)  # (B, V_main)
        # constrained rows: what their grammar forbids (end tokens included) at -inf.
        fused = apply_masks(fused, [r.constraint for r in rows])
        # choose each row's token; no end token before its min_new_tokens.
        device = fused.device  # sampling and masks run where the fused logits are
        early = torch.tensor([r.generated < r.config.min_new_tokens for r in rows], device=device)
        eos = torch.tensor(sorted(self.main_member.eos_ids), dtype=torch.long, device=device)
        fused = suppress_end_tokens(fused, eos, early, in_place=not shares_memory(fused, logits))
        tokens = self._choose(fused)
        self._note_logprobs(fused, tokens)
        if self.hooks.on_step is not None:
            at = [r.index for r in rows]
            self.hooks.on_step(StepRecord(logits, tokens, at, step_weights(rows)))
        finished = self._append(tokens)
        self._sync(finished)
        spent = time.perf_counter() - t0
        for row in rows:
            row.usage.fusion_seconds += spent
        # hand out what is final, finish rows, and let the finished ones go.
        events: list[tuple[Row, StreamEvent]] = []
        for b, row in enumerate(rows):
            if b in finished:
                events.extend((row, e) for e in self._finish(b, finished[b]))
            elif delta := row.text.delta():
                event = StreamEvent(delta=delta, index=row.index, logprobs=row.take_logprobs())
                events.append((row, event))
        self._keep([b for b in range(len(rows)) if b not in finished])
        return events

    def _fuse(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Fused (B, V_main) logits, each row through its own fuser (rows sharing one are
        fused together).
        """
        main_logits = logits[self.main]
        if len(self.members) == 1:
            return main_logits.float()
        groups: dict[int, list[int]] = {}
        for b, row in enumerate(self.rows):
            groups.setdefault(id(row.fuser), []).append(b)
        if len(groups) == 1:
            return fuse_rows(self.rows, logits)
        # several fusers: the rows meet on the main member's device (each fuser fused on
        # its own fusion device)
        device = main_logits.device
        fused = torch.empty(main_logits.shape, dtype=torch.float32, device=device)
        for rows in groups.values():
            index = torch.tensor(rows)
            part = fuse_rows([self.rows[b] for b in rows], [x[index.to(x.device)] for x in logits])
            fused[index.to(device)] = part.to(device)
        return fused

    def _choose(self, fused: torch.Tensor) -> list[int]:
        """Each row's token, rows with the same sampling settings sampled together."""
        groups: dict[tuple[float, int, float], list[int]] = {}
        for b, row in enumerate(self.rows):
            cfg = row.config
            groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(b)
        tokens = [0] * len(self.rows)
        for (temperature, top_k, top_p), rows in groups.items():
            sampler = Sampler(temperature, top_k, top_p)
            part = fused if len(groups) == 1 else fused[torch.tensor(rows, device=fused.device)]
            chosen = sampler(part, [self.rows[b].uniform(self.rows[b].generated) for b in rows])
            for b, token in zip(rows, chosen):
                tokens[b] = token
        return tokens

    def _note_logprobs(self, fused: torch.Tensor, tokens: list[int]) -> None:
        """Note the chosen tokens' log-probabilities for the rows that ask for them."""
        asking = [b for b, row in enumerate(self.rows) if row.config.logprobs is not None]
        if not asking:
            return
        index = torch.tensor(asking, device=fused.device)
        logp = torch.log_softmax(fused[index].float(), dim=-1)  # (b, V) on the device
        texts, eos = self.main_member.vocab.texts, self.main_member.eos_ids
        for logp_b, b in zip(logp, asking):
            note_logprob(self.rows[b], logp_b, tokens[b], texts, eos)

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
            if row.constraint is not None:
                row.constraint.advance(token)
            if row.text.stopped:
                finished[b] = "stop"
            elif row.constraint is not None and row.constraint.finished:
                finished[b] = "eos"  # the structure is complete: only an end token could follow
            elif row.generated >= row.config.max_new_tokens:
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

    def _finish(self, b: int, reason: str) -> Iterator[StreamEvent]:
        row = self.rows[b]
        if reason != "stop":
            row.text.finish()
            if row.text.stopped:
                reason = "stop"
        if delta := row.text.delta(final=True):
            yield StreamEvent(delta=delta, index=row.index, logprobs=row.take_logprobs())
        usage = row.usage
        for batch in self.batches:
            usage.fed_positions[batch.member.name] = batch.rows[b].fed_positions
        usage.total_seconds = time.perf_counter() - row.start
        token_ids = list(self.batches[self.main].rows[b].generated_ids)
        yield StreamEvent(
            index=row.index,
            finish_reason=reason,
            usage=usage,
            token_ids=token_ids,
            logprobs=row.take_logprobs(),
        )

    # --- rows out, forwards -------------------------------------------------------------

    def advance(self) -> None:
        """Feed every member the positions its cache lacks, for every running row (helpers
        wait when the next step is speculative: its verification forward feeds them).
        """
        wait = self.speculator.helpers_wait()  # never with Ray members (logits_needed)
        with self.speculator.shortlisted(wait):
            self._forward([self.batches[self.main]] if wait else self.batches, self.rows)

    def remove(self, leaving: Sequence[Row]) -> None:
        """Drop rows without finishing them (their reader left); frees their cache rows."""
        gone = {id(row) for row in leaving}
        self._keep([b for b, row in enumerate(self.rows) if id(row) not in gone])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        for batch in self.batches:
            if keep:
                batch.keep_rows(keep)
            else:
                batch.free()

    def _forward(
        self,
        batches: list[MemberBatch],
        rows: list[Row],
        report: Callable[[Member, Sequence[Row], int, int], None] | None = None,
    ) -> None:
        """Feed every member; members on distinct devices or in Ray actors run concurrently
        (torch releases the GIL in its kernels; a Ray member's thread only waits), so a
        step waits only for the slowest member. Each row is charged the forward time of
        the passes it took part in; `report` hears each member's progress (the prefill's
        `DecodeHooks.on_prefill`).
        """
        for batch in batches:  # what a remote member sends
            i = self.member_index[[m is batch.member for m in self.members].index(True)]
            batch.logits_needed = logits_needed(rows, i)
        before = [batch.forward_seconds for batch in batches]
        feeds = [
            partial(batch.forward, None if report is None else partial(report, batch.member, rows))
            for batch in batches
        ]
        if self.pool is None:
            for feed in feeds:
                feed()
        else:
            for future in [self.pool.submit(feed) for feed in feeds]:
                future.result()
        for batch, start in zip(batches, before):
            spent = batch.forward_seconds - start
            batch.member.forward_seconds += spent
            for row in rows:
                seconds = row.usage.forward_seconds
                seconds[batch.member.name] = seconds.get(batch.member.name, 0.0) + spent

    def close(self) -> None:
        """Free every member's cache and the worker threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for batch in self.batches:
            batch.free()
        self.rows = []
