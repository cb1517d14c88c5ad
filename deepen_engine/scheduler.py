"""Continuous batching: one worker thread owns the members, and requests from any thread
or task share its forward passes.

Steps of the worker loop (`Scheduler._work`):

1. Wait until a request waits or rows run.
2. Drop the rows of requests whose reader left or whose timeout passed (the latter get a
   `RequestTimeoutError`).
3. Admit waiting rows, oldest request first, up to `max_batch_size` running rows and each
   request's own `batch_size`: they are tokenised (a bad request fails alone), prefilled
   together and join the running batch.
4. One decoding step for every running row; hand each request its events.
5. Feed the members the new positions (the next step's logits).

All rows of a batch share one main member and one set of members run (all of them, or
the main member alone for rows whose fusion is the identity). A request whose batch key
differs waits until the running batch has drained, then the oldest waiting request's key
is served; requests that came after it wait behind it, whatever their key (first come,
first served), so a steady stream of requests of the running key cannot starve it. Rows
with different fusion settings but the same key (say eta 0.15 and 0.3) share the batch:
each row is fused with its own settings.

`main="auto"` rows are scored (their leader chosen) before they are admitted, oldest first
while the running rows and the waiting rows already holding a scoring prefill leave room;
each keeps that prefill until it joins, which adopts it (decoding/leaders.py), also when
it waits for the running batch of another leader to drain. A waiting request that leaves
(cancelled, timed out, failed, the ensemble closed) frees its rows' prefill.

A member whose forward pass fails (`MemberError`) fails every request running in the
batch; their caches are freed and the next requests are served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial

from .config import SchedulerConfig
from .decoding.cache_ops import cache_bytes
from .decoding.leaders import assign_leaders
from .decoding.loop import BatchDecoder
from .decoding.rows import DecodeHooks, NewRow, Row
from .errors import ConfigError, QueueFullError
from .members import Member
from .openmp import follow_thread_count, hand_over, release_thread_pool
from .outputs import Progress, StreamEvent
from .scheduled_request import Request


class Scheduler:
    """The queue and the worker thread of one set of loaded members."""

    def __init__(self, members: Sequence[Member], config: SchedulerConfig) -> None:
        self.members = list(members)
        self.config = config
        self._cond = threading.Condition()
        self._waiting: list[Request] = []  # requests with rows not admitted yet
        self._decoder: BatchDecoder | None = None
        self._key: tuple[int, bool] | None = None  # the running batch's key
        self._thread: threading.Thread | None = None
        self._closed = False
        self._threads = 0  # torch threads of the last submitter, followed by the worker

    def submit(self, request: Request) -> None:
        """Queue a request; raises `QueueFullError` at once when the queue is full."""
        if threading.current_thread() is not self._thread:  # (openmp.py) its pool freed,
            self._threads = hand_over()  # and its torch thread count for the worker
        with self._cond:
            if self._closed:
                raise ConfigError("this ensemble was closed; make a new one.")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_queue="
                    f"{self.config.max_queue}); retry later, or raise "
                    "SchedulerConfig.max_queue."
                )
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="deepen-scheduler", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def wake(self) -> None:
        """Let the worker notice a cancelled request now (it also checks every step)."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker after its current step; running requests fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def running_rows(self) -> int:
        """Rows in the running batch now."""
        decoder = self._decoder
        return len(decoder.rows) if decoder is not None else 0

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the running batch's KV caches and of the scoring prefill waiting
        main="auto" rows hold, of the members in this process (a Ray member's cache is in
        its actor). Read from any thread: shapes only.
        """
        decoder = self._decoder
        running = sum(cache_bytes(b.cache) for b in decoder.batches) if decoder else 0
        with self._cond:
            rows = [r for q in self._waiting for r in q.waiting_rows]
        return running + sum(cache_bytes(b.cache) for r in rows for b in r.prefill or [])

    @property
    def waiting_requests(self) -> int:
        """Requests with rows still waiting to start."""
        with self._cond:
            return len(self._waiting)

    # --- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            # 1. wait for work.
            with self._cond:
                while not self._closed and not self._waiting and not self.running_rows:
                    release_thread_pool()  # idle: other threads' torch work runs alone
                    self._cond.wait()
                if self._closed:
                    self._shut_down()
                    return
                follow_thread_count(self._threads)
            # 2. drop rows whose reader left or whose time is up.
            self._drop_leaving()
            # 3. admit waiting rows.
            self._admit()
            decoder = self._decoder
            if decoder is None or not decoder.rows:
                continue
            try:
                # 4. one step for every running row (progress first: the final events
                # end the readers).
                stepping = [_owner(row) for row in decoder.rows]
                events = decoder.step()
                self._step_progress(stepping)
                for row, event in events:
                    self._deliver(row, event)
                # 5. the next step's logits.
                if decoder.rows:
                    decoder.advance()
            except BaseException as exc:  # a member failed, or a bug: fail the batch
                self._fail_batch(exc)

    def _drop_leaving(self) -> None:
        now = time.monotonic()
        gone: list[Request] = []
        with self._cond:
            for request in list(self._waiting):
                if request.cancelled.is_set() or request.expired(now):
                    self._forget_waiting(request)
                    gone.append(request)
        decoder = self._decoder
        leaving = []
        if decoder is not None:
            for row in decoder.rows:
                request = _owner(row)
                if request.cancelled.is_set() or request.failed or request.expired(now):
                    leaving.append(row)
                    request.running -= 1
                    gone.append(request)
            if leaving:
                decoder.remove(leaving)  # frees their cache rows before the reader hears
        for request in {id(r): r for r in gone}.values():
            if not request.cancelled.is_set():
                request.fail(request.timeout_error())
            self._release_if_out(request)

    def _release_if_out(self, request: Request) -> None:
        with self._cond:
            waiting = request in self._waiting
        if request.running <= 0 and not waiting:
            request.release()

    def _admit(self) -> None:
        """Admit waiting rows into the running batch (see the module docstring)."""
        chosen: list[tuple[Request, list[NewRow]]] = []
        self._lead_waiting()
        with self._cond:
            if not self._waiting:
                return
            if self._decoder is None or not self._decoder.rows:
                self._decoder_for(self._waiting[0])
            decoder = self._decoder
            assert decoder is not None
            room = self.config.max_batch_size - len(decoder.rows)
            for request in list(self._waiting):
                if room <= 0:
                    break
                if request.main is None and not request.led:
                    continue  # an auto request's leaders are chosen first
                if request.key != self._key:
                    # first come, first served across keys: later requests wait behind
                    # it, so the batch drains and its key is next (were they admitted, a
                    # steady stream of them would keep it waiting past any timeout)
                    break
                cap = len(request.rows) if request.batch_size is None else request.batch_size
                take = min(room, cap - request.running, len(request.rows) - request.admitted)
                take = request.same_key(request.admitted, take) if take > 0 else take
                if take <= 0:
                    continue
                rows = request.rows[request.admitted : request.admitted + take]
                request.admitted += take
                request.running += take
                room -= take
                chosen.append((request, rows))
                if request.admitted == len(request.rows):
                    self._waiting.remove(request)
        self._join(chosen)

    def _lead_waiting(self) -> None:
        """Choose the leader of the rows of waiting main="auto" requests, oldest first, while
        the batch has room for them (a prefill per member scores their prompts, and the
        rows that fit keep it for their join: decoding/leaders.py); a bad prompt fails its
        request. Requests that would not fit are scored when room opens: scoring them now
        would stall the running rows for a prefill their join would repeat. Waiting rows
        that hold a prefill (say behind another leader's batch) count as running: the
        caches held stay within `max_batch_size` rows.
        """
        with self._cond:
            todo = [r for r in self._waiting if r.main is None and not r.led]
            held = sum(row.prefill is not None for q in self._waiting for row in q.waiting_rows)
        room = self.config.max_batch_size - self.running_rows - held  # rows that keep it
        for request in todo:
            if room <= 0:
                break
            try:
                rows = assign_leaders(
                    self.members,
                    request.rows,
                    self.config.prefill_chunk,
                    room,
                    partial(self._reading_progress, request),
                )
                request.rows, request.led, room = rows, True, room - len(rows)
            except BaseException as exc:
                self._abandon(request, exc)
                self._release_if_out(request)

    def _join(self, chosen: list[tuple[Request, list[NewRow]]]) -> None:
        decoder = self._decoder
        if decoder is None or not chosen:
            return
        prepared = []
        for request, rows in chosen:
            try:
                prepared.append((request, decoder.prepare(rows)))
            except BaseException as exc:  # a bad prompt fails its own request only
                request.running -= len(rows)
                for row in rows:
                    row.drop_prefill()
                self._abandon(request, exc)
                self._release_if_out(request)
        if not prepared:
            return
        merged = prepared[0][1]
        for _, more in prepared[1:]:
            merged.extend(more)
        try:
            decoder.join(merged)
        except BaseException as exc:  # a member failed at the prefill: these rows fail
            for request, part in prepared:
                request.running -= len(part.rows)
                self._abandon(request, exc)
                self._release_if_out(request)

    def _prefill_progress(self, member: Member, rows: Sequence[Row], done: int, total: int) -> None:
        """Tell the requests whose rows are being prefilled how far `member` has read."""
        for request in {id(_owner(r)): _owner(r) for r in rows}.values():
            self._reading_progress(request, member, done, total)

    def _reading_progress(self, request: Request, member: Member, done: int, total: int) -> None:
        """Tell the request how far `member` has read its prompts (main="auto": while the
        prefill that scores them chooses their leaders, which their batch then adopts).
        """
        if request.progress:
            request.sink("progress", Progress("prefill", done, total, member.name))

    def _step_progress(self, stepping: list[Request]) -> None:
        """Count the tokens a step chose for each request (one per row it ran)."""
        for request in {id(r): r for r in stepping}.values():
            request.generated += sum(r is request for r in stepping)
            if request.progress:
                budget = sum(row.config.max_new_tokens for row in request.rows)
                request.sink("progress", Progress("generate", request.generated, budget))

    def _deliver(self, row: Row, event: StreamEvent) -> None:
        request = _owner(row)
        if request.failed or request.cancelled.is_set():
            return
        request.sink("event", event)
        if event.finish_reason is not None:
            request.running -= 1
            request.finished += 1
            if request.finished == len(request.rows):
                request.sink("done", None)
                request.release()

    def _abandon(self, request: Request, error: BaseException) -> None:
        """Fail a request and forget its waiting rows (its running rows leave next step)."""
        with self._cond:
            if request in self._waiting:
                self._forget_waiting(request)
        request.fail(error)

    def _forget_waiting(self, request: Request) -> None:
        """Take a request out of the queue (the caller holds the lock), freeing the scoring
        prefill its rows not admitted hold.
        """
        self._waiting.remove(request)
        request.drop_prefill()

    def _fail_batch(self, error: BaseException) -> None:
        decoder, self._decoder = self._decoder, None
        if decoder is None:
            return
        requests = {id(_owner(r)): _owner(r) for r in decoder.rows}.values()
        decoder.close()  # caches freed before any reader hears of the failure
        for request in requests:
            request.running = 0
            self._abandon(request, error)
            self._release_if_out(request)

    def _decoder_for(self, request: Request) -> None:
        if self._decoder is not None and self._key == request.key:
            return
        if self._decoder is not None:
            self._decoder.close()
        self._decoder = BatchDecoder(
            self.members,
            request.key[0],
            request.key[1],
            DecodeHooks(on_prefill=self._prefill_progress),
            prefill_chunk=self.config.prefill_chunk,
            speculate_max_rows=self.config.speculate_max_rows,
            draft_precision=self.config.draft_precision,
        )
        self._key = request.key

    def _shut_down(self) -> None:
        error = ConfigError("the ensemble was closed while this request was waiting or running.")
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            request.drop_prefill()
            request.fail(error)
            if request.running <= 0:
                request.release()
        self._fail_batch(error)


def _owner(row: Row) -> Request:
    owner = row.owner
    assert isinstance(owner, Request)
    return owner
