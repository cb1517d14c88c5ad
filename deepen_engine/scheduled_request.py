"""The scheduler's record of one call (scheduler.py): its rows, where its events go (the
`Sink`), its limits, and how far it got (rows admitted, running, finished).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .decoding.rows import NewRow
from .errors import RequestTimeoutError

Sink = Callable[[str, object], None]
"""Receives ("event", StreamEvent)s, then ("done", None) or ("error", exception), and last
("released", None) once none of the request's rows is in the batch any more (its cache
rows are freed); a request that asked for progress also gets ("progress", Progress)
messages as its prompts are read and after each step. Called from the worker thread."""


@dataclass(eq=False)
class Request:
    """One call's rows, where its events go, and its limits."""

    rows: list[NewRow]  # every row of the request (main="auto": ordered by leader)
    main: int | None  # None: main="auto", each row's leader chosen at admission
    run_helpers: bool
    sink: Sink
    batch_size: int | None = None  # most rows of this request running at once
    deadline: float | None = None  # time.monotonic() past which it fails
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted: int = 0  # rows that joined the batch so far
    running: int = 0  # rows in the batch now
    finished: int = 0  # rows done
    failed: bool = False
    released: bool = False
    progress: bool = False  # whether the reader wants ("progress", Progress) messages
    generated: int = 0  # tokens chosen for the request's rows so far
    led: bool = False  # main="auto": the rows' leaders are chosen

    @property
    def key(self) -> tuple[int, bool]:
        """Requests with the same key can share a batch (main="auto": the key of the next
        row to admit, whose leader is chosen by then).
        """
        if self.main is None:
            row = self.rows[min(self.admitted, len(self.rows) - 1)]
            return (row.fuser.main, not row.fuser.is_identity)
        return (self.main, self.run_helpers)

    def same_key(self, start: int, take: int) -> int:
        """How many of the `take` rows from `start` share the row at `start`'s leader."""
        if self.main is None:
            lead = self.rows[start].fuser.main
            rows = self.rows[start : start + take]
            return next((n for n, r in enumerate(rows) if r.fuser.main != lead), len(rows))
        return take

    @property
    def waiting_rows(self) -> list[NewRow]:
        """Its rows not admitted yet."""
        return self.rows[self.admitted :]

    def drop_prefill(self) -> None:
        """Free the scoring prefill its rows not admitted hold (main="auto": kept for their
        join, decoding/leaders.py), when it leaves the queue without them.
        """
        for row in self.waiting_rows:
            row.drop_prefill()

    def expired(self, now: float) -> bool:
        """Whether its timeout has passed at `now` (`time.monotonic()`)."""
        return self.deadline is not None and now > self.deadline

    def timeout_error(self) -> RequestTimeoutError:
        """The error of a request that ran past its timeout."""
        timeout = self.rows[0].config.timeout if self.rows else None
        return RequestTimeoutError(
            f"the request ran past its timeout of {timeout} s (waiting included) and was "
            "stopped; raise GenerationConfig.timeout, or send fewer or shorter requests at once."
        )

    def fail(self, error: BaseException) -> None:
        """Hand the reader an error, once."""
        if not self.failed:
            self.failed = True
            self.sink("error", error)

    def release(self) -> None:
        """Tell the reader, once, that no row of this request runs any more, and drop its
        rows: each names this request as its owner, and the cycle kept a finished
        request's rows (their fusers and prompts) alive until a full garbage collection.
        """
        if not self.released:
            self.released = True
            self.rows = []
            self.sink("released", None)
