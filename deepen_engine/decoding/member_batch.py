"""Keeping one member's token ids and KV cache in step with the shared text, for a batch.

The main member appends the token it chose. Every other member ("helper") is told each
row's generated text; its ids must equal its own tokenisation of `prompt + text`, which can
change earlier tokens (merges across the boundary). A helper compares the new ids with the
old ones, rolls the row back to the first difference and feeds only the ids from there.

Layout of the batched cache, `(B, heads, T, dim)` per layer, with a `(B, T)` mask `valid`:

- rows are left-padded at the prefill;
- a row rolled back by r positions marks its last r valid positions invalid (a hole), and
  rows feeding fewer ids than the widest row in a step are padded on the left of the chunk
  (also holes). Masked positions are never attended to; position ids count only a row's
  valid positions, so a row computes exactly what it would alone;
- holes are squeezed out by a gather (`cache_ops.compact`) when they waste a quarter of the cache.
  A sliding window counts cache slots, so once a sliding-window model's cache reaches its
  window no hole may stay: rows that feed fewer ids than the widest row re-feed their
  latest ids instead of padding, and the holes are squeezed out before the forward.

A helper re-tokenises only the tail of a row's text (text_sync.py).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from ..members import Member
from ..members.output_layer import ShortlistHead
from .cache_ops import (
    common_prefix,
    compact,
    drop_unused_leading_slots,
    holes,
    left_pad,
    left_pad_mask,
)
from .member_forward import member_forward
from .prompt_scores import logits_kept, score_pass, score_width
from .row_ids import RowIds
from .text_sync import plan_sync

PREFILL_CHUNK = 512  # positions a row feeds per forward pass (`SchedulerConfig.prefill_chunk`)


class MemberBatch:
    """One member's rows, KV cache and latest next-token logits (float32, on the member's
    device; the ids and the mask `valid` are kept on the CPU and sent with each forward).
    """

    chunk: int = PREFILL_CHUNK
    """Most positions a row feeds in one forward pass; `0`: no limit."""

    def __init__(self, member: Member, prompts_ids: list[list[int]]) -> None:
        self.member = member
        self.rows = [RowIds(prompt_ids=list(p), ids=list(p)) for p in prompts_ids]
        # A cache built without the model config keeps full layers even for sliding-window
        # models (the model still masks by the window), so any position can be rolled back.
        self.cache: Any = DynamicCache()
        self.valid = torch.zeros(len(self.rows), 0, dtype=torch.bool)  # (B, T)
        self.logits: torch.Tensor | None = None  # (B, V) after each row's last id
        self.forward_seconds = 0.0
        # Top logits per row the loop's fusion reads from this member (None: all of them);
        # set by the loop before each forward. A batch in another process sends only those
        # (remote/batch.py); this one keeps the full logits anyway.
        self.logits_needed: int | None = None
        # Whether the prefill scores the rows' prompts (decoding/prompt_scores.py); set by
        # the loop for rows whose fusion reads the scores.
        self.score_prompts = False
        # Speculative verification (decoding/speculative.py): when true, each forward keeps
        # the logits after every fed position, by row: (first position, (n, V) logits).
        self.keep_fed_logits = False
        self.fed_logits: list[list[tuple[int, torch.Tensor]]] = []
        # Shortlist drafting (decoding/main_drafts.py): when set, forwards compute the
        # logits over these output rows only (-inf elsewhere) and each fed row keeps its
        # hidden state after its last id (`RowIds.owed`) for the full output layer later.
        self.shortlist: ShortlistHead | None = None
        # Drafting in lower precision (members/draft_body.py): when set, forwards run this
        # body instead of the member's; the positions they feed count as `RowIds.drafted`.
        self.draft_body: torch.nn.Module | None = None
        config = member.model.config
        window = getattr(config, "sliding_window", None)
        self._window: int | None = int(window) if window else None
        pad = member.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0

    @contextmanager
    def heads(
        self, shortlist: ShortlistHead | None, body: torch.nn.Module | None
    ) -> Iterator[None]:
        """Forwards inside stop at `shortlist` and run `body` (None, None: the member's own
        body and full output layer); the settings before are back after.
        """
        saved = self.shortlist, self.draft_body
        self.shortlist, self.draft_body = shortlist, body
        try:
            yield
        finally:
            self.shortlist, self.draft_body = saved

    def require_logits(self) -> torch.Tensor:
        """The latest (B, V) next-token logits, over the full vocabulary (rows a shortlisted
        forward left owing get their full output layer now, rows a draft body fed are fed
        again); none before the first forward.
        """
        if any(r.drafted for r in self.rows):
            with self.heads(None, None):
                self.forward()
        logits = self.shortlisted_logits()
        owed = [(b, r.owed) for b, r in enumerate(self.rows) if r.owed is not None]
        layer = self.member.output_layer
        if owed and layer is not None:
            index = torch.tensor([b for b, _ in owed], device=logits.device)
            with torch.no_grad():
                logits[index] = layer.logits(torch.stack([h for _, h in owed])).float()
            for r in self.rows:
                r.owed = None
        return logits

    def shortlisted_logits(self) -> torch.Tensor:
        """The latest (B, V) logits as the last forward left them: rows with `owed` hidden
        states hold shortlisted logits (-inf off the shortlist); for drafting only.
        """
        if self.logits is None:
            raise RuntimeError(f"member {self.member.name!r} has no logits before its forward")
        return self.logits

    def fits(self, row: int) -> bool:
        """Whether all of a row's ids fit the member's context window (positions 0..W-1),
        so they can be fed; a model without a stated window always fits.
        """
        window = self.member.context_window
        return window is None or len(self.rows[row].ids) <= window

    def append(self, row: int, token_id: int) -> None:
        """Main member: append the chosen token to a row."""
        self.rows[row].ids.append(token_id)

    def sync_text(self, row: int, text: str) -> None:
        """Helper member: make a row's ids equal the tokenisation of prompt + `text`.

        `text` is the row's whole generated text; it only grows between calls. Only its
        tail is re-tokenised (text_sync.py).
        """
        self.apply_plan(row, self.plan_sync(self.rows[row], text))

    def plan_sync(self, r: RowIds, text: str) -> tuple[list[int], list[int]]:
        """The ids and byte ends `sync_text` would give row ids `r` for `text` (a text
        that extends the one `r` holds), without changing anything (text_sync.py).
        """
        texts = self.member.vocab.texts
        return plan_sync(r.prompt_ids, r.ids, r.ends, text, texts, self._encode)

    def apply_plan(self, row: int, plan: tuple[list[int], list[int]]) -> None:
        """Make a row's ids and byte ends a plan's (`plan_sync`), rolling the cache back
        to the first id that differs.
        """
        r = self.rows[row]
        target, r.ends = plan
        keep = common_prefix(r.ids, target)
        if keep == len(target) and keep < len(r.ids):
            keep -= 1  # a shorter tokenisation: re-feed its last id to get fresh logits
        r.ids = target
        self._roll_back(row, keep)

    def replace_ids(self, row: int, keep: int, tail: list[int]) -> None:
        """Make a row's ids its first `keep` ids followed by `tail`, rolling its cache back
        to `keep`: the edit `append` and `sync_text` make, as a batch in another process
        receives it (remote/protocol.EditIds).
        """
        r = self.rows[row]
        r.ids = r.ids[:keep] + list(tail)
        self._roll_back(row, keep)

    def _encode(self, text: str) -> list[int]:
        return self.member.tokenizer(text, add_special_tokens=False).input_ids

    def _roll_back(self, row: int, keep: int) -> None:
        """Drop a row's cached positions after its first `keep` ids (they become holes)."""
        r = self.rows[row]
        if keep < r.cached:
            stale = self.valid[row].nonzero().squeeze(1)[keep:]  # the row's last positions
            self.valid[row, stale] = False
            r.drafted = max(0, r.drafted - (r.cached - keep))
            r.cached = keep

    def forward(self, on_fed: Callable[[int, int], None] | None = None) -> None:
        """Feed every row the ids its cache lacks: one forward pass, or one per `chunk`
        positions when a row has more (a long prompt's prefill), so attention's memory is
        bounded by `chunk` times the cache length instead of the prompt length squared.

        `on_fed(done, total)` is called after each pass with the positions fed so far and
        in all (for progress bars).
        """
        if self.draft_body is None:  # an exact forward: what a draft body fed is fed again
            for b, r in enumerate(self.rows):
                self._roll_back(b, r.cached - r.drafted)
        total = sum(len(r.ids) - r.cached for r in self.rows)
        done = 0
        while True:
            pending = max((len(r.ids) - r.cached for r in self.rows), default=0)
            if pending == 0:
                return
            limit = min(pending, self.chunk) if self.chunk else pending
            if self.score_prompts:
                for r in self.rows:
                    r.score.begin(r.prompt_ids, self.member.vocab.texts)
            if self._scoring():  # every position's logits are kept: bound their memory
                limit = score_width(len(self.rows), len(self.member.vocab), limit)
            done += self._forward_once(limit)
            if on_fed is not None:
                on_fed(min(done, total), total)

    def _forward_once(self, limit: int) -> int:
        """One forward pass feeding each row at most `limit` of the ids its cache lacks;
        returns the positions fed (a sliding window's re-fed ones included).
        """
        width = max(min(len(r.ids) - r.cached, limit) for r in self.rows)
        start = time.perf_counter()
        self._make_room(width, limit)
        pending = [r.ids[r.cached : r.cached + limit] for r in self.rows]
        width = max(len(ids) for ids in pending)
        input_ids, chunk_valid, positions = self._chunk(pending, width)
        mask = torch.cat([self.valid, chunk_valid], dim=1)  # (B, T + W)
        scoring = self._scoring()
        keep = 1
        if self.keep_fed_logits:
            keep = width
        elif scoring:
            keep = logits_kept(pending, [r.cached for r in self.rows], [r.score for r in self.rows])
        inputs = (input_ids, mask, positions)
        shortlist = self.shortlist if keep == 1 else None  # a shortlist gives last logits only
        # each row may also draft the tokens its own ids hold (a prompt's rare words, which
        # answers copy): the shortlist's missing ones get their rows too
        extras = [shortlist.missing(r.ids) for r in self.rows] if shortlist else None
        out_logits, hidden = member_forward(
            self.member, self.cache, inputs, keep, shortlist, extras, self.draft_body
        )
        # float32 for fusion whatever the member's dtype; kept on the member's device
        # (fusion reads it there: deepen_engine/devices.py)
        if scoring:  # (B, keep, V): each prompt token's log-likelihood, before the rows move on
            score_pass(
                out_logits,
                pending,
                [r.cached for r in self.rows],
                [r.ids for r in self.rows],
                [len(r.prompt_ids) for r in self.rows],
                self.member.vocab.texts,
                [r.score for r in self.rows],
            )
        logits = out_logits[:, -1, :].float()  # (B, V)
        if self.keep_fed_logits:  # every fed position's logits, (n, V) per row
            for b, (r, ids) in enumerate(zip(self.rows, pending)):
                if ids:
                    kept = out_logits[b, width - len(ids) :, :].float()
                    self.fed_logits[b].append((r.cached, kept))
        if logits.device.type == "cuda":  # forward_seconds counts the kernels, not launches
            torch.cuda.synchronize(logits.device)
        if self.logits is not None:  # rows that fed nothing keep their logits
            unchanged = torch.tensor([not ids for ids in pending], device=logits.device)
            logits[unchanged] = self.logits[unchanged]
        self.logits = logits
        self.valid = mask
        fed = 0
        for b, (r, ids) in enumerate(zip(self.rows, pending)):
            if ids:  # shortlisted logits owe the full layer on this (exact) hidden state
                r.owed = None if hidden is None or self.draft_body else hidden[b]
                r.drafted = r.drafted + len(ids) if self.draft_body else 0
            # only positions past the prompt count as sync cost
            r.fed_positions += max(0, r.cached + len(ids) - max(r.cached, len(r.prompt_ids)))
            fed += len(ids)
            r.cached += len(ids)
        self.forward_seconds += time.perf_counter() - start
        return fed

    def _scoring(self) -> bool:
        """Whether the next pass keeps every position's logits to score prompt tokens."""
        return self.score_prompts and any(r.score.next < len(r.prompt_ids) for r in self.rows)

    def _make_room(self, width: int, limit: int) -> None:
        """Squeeze holes out of the cache where they would cost (see the module docstring)."""
        if self._window is not None and self.valid.shape[1] + width >= self._window:
            # A sliding window counts cache slots: no hole may sit inside it. Rows with
            # fewer new ids (at most `limit` each) re-feed their latest ones, then holes
            # are squeezed out.
            for b, r in enumerate(self.rows):
                new = min(len(r.ids) - r.cached, limit)
                self._roll_back(b, max(0, r.cached - (width - new)))
            if holes(self.valid):
                self.valid = compact(self.cache, self.valid)
        elif (count := holes(self.valid)) and count * 4 >= self.valid.numel():
            self.valid = compact(self.cache, self.valid)  # holes waste a quarter of the cache

    def _chunk(
        self, pending: list[list[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (B, W) input ids, validity and position ids of a step's new ids,
        right-aligned so the last slot holds each row's newest id.
        """
        batch = len(self.rows)
        input_ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        chunk_valid = torch.zeros(batch, width, dtype=torch.bool)
        positions = torch.zeros(batch, width, dtype=torch.long)
        for b, (r, ids) in enumerate(zip(self.rows, pending)):
            if ids:
                input_ids[b, width - len(ids) :] = torch.tensor(ids)
                chunk_valid[b, width - len(ids) :] = True
                positions[b, width - len(ids) :] = torch.arange(r.cached, r.cached + len(ids))
        return input_ids, chunk_valid, positions

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); finished rows stop costing compute."""
        if rows == list(range(len(self.rows))):
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.rows = [self.rows[i] for i in rows]
        self.valid = self.valid[index]
        if self.logits is not None:
            self.logits = self.logits[index.to(self.logits.device)]
        if self.cache.get_seq_length() > 0:
            for layer in self.cache.layers:  # each on its own device in a sharded member
                if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                    layer.batch_select_indices(index.to(layer.keys.device))
        # cut slots no row uses: a batch that never empties would grow a slot per step
        self.valid = drop_unused_leading_slots(self.cache, self.valid)

    def take_row(self, b: int) -> MemberBatch:
        """Row b alone: a copy of its ids, cache slots and logits (decoding/leaders.py: a
        row's decoder adopts the prefill that chose `main="auto"`'s leader this way).
        """
        one = MemberBatch(self.member, [])
        one.chunk, one.score_prompts = self.chunk, self.score_prompts
        one.rows = [copy.deepcopy(self.rows[b])]
        for i, layer in enumerate(self.cache.layers):
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                one.cache.update(layer.keys[b : b + 1].clone(), layer.values[b : b + 1].clone(), i)
        one.valid = drop_unused_leading_slots(one.cache, self.valid[b : b + 1].clone())
        one.logits = None if self.logits is None else self.logits[b : b + 1].clone()
        return one

    def take_rows(self, rows: list[int]) -> list[MemberBatch]:
        """Each of these rows alone (`take_row`); a batch in a Ray actor copies them in
        one call (remote/batch.py).
        """
        return [self.take_row(b) for b in rows]

    def merge(self, other: MemberBatch) -> None:
        """Append the rows of `other` (same member, prefilled) after this batch's rows.

        The shorter of the two caches is left-padded with masked slots, which no row
        attends to and which hold no position (position ids count valid slots only), so
        every row computes what it would alone.
        """
        if not self.rows:
            self.rows, self.cache, self.valid = other.rows, other.cache, other.valid
            self.logits = other.logits
            other.free()  # its state lives on here; the object itself is done
            return
        width = max(self.valid.shape[1], other.valid.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        self.valid = torch.cat(
            [left_pad_mask(self.valid, width), left_pad_mask(other.valid, width)]
        )
        self.rows = self.rows + other.rows
        if self.logits is not None and other.logits is not None:
            self.logits = torch.cat([self.logits, other.logits])
        other.free()

    def free(self) -> None:
        """Drop the KV cache and the rows."""
        self.cache = DynamicCache()
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.rows = []
        self.logits = None
