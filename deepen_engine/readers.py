"""Reading a request's results on the caller's side: the scheduler's worker thread posts
messages (see `scheduler.Sink`), a reader turns them into a stream of `StreamEvent`s, in
a thread (`read`) or on an asyncio loop (`aread`).

When the reader stops early (the stream is closed, or its task cancelled) it marks the
request cancelled, wakes the worker, and waits (up to `RELEASE_WAIT` seconds) until the
request's rows have left the batch, so their caches are freed when `close()` returns.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from .outputs import Progress, StreamEvent
from .scheduled_request import Request, Sink
from .scheduler import Scheduler

RELEASE_WAIT = 60.0  # seconds a stopped reader waits for its rows to leave the batch


OnProgress = Callable[[Progress], None]


class _Messages:
    """The state of one reader: what each message means."""

    def __init__(self, on_progress: OnProgress | None = None) -> None:
        self.released = False
        self.done = False
        self.on_progress = on_progress

    def take(self, kind: str, item: Any) -> StreamEvent | None:
        """The event a message carries, if any; raises the request's error; hands
        progress to the caller's callback (in the reader's thread).
        """
        if kind == "released":
            self.released = True
        elif kind == "error":
            raise item
        elif kind == "done":
            self.done = True
        elif kind == "progress":
            if self.on_progress is not None and not self.done:
                self.on_progress(item)
        else:
            return item  # an "event" message carries one
        return None


def read(
    scheduler: Scheduler,
    submit: Callable[[Sink], Request],
    on_progress: OnProgress | None = None,
) -> Generator[StreamEvent, None, None]:
    """Submit a request (`submit(sink)`) and yield its events in this thread;
    `on_progress` is called, in this thread, with each `Progress` the request reports.
    """
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    request = submit(lambda kind, item: inbox.put((kind, item)))
    state = _Messages(on_progress)
    try:
        while not state.done:
            event = state.take(*inbox.get())
            if event is not None:
                yield event
    finally:
        request.cancelled.set()
        scheduler.wake()
        while not state.released:
            try:
                state.take(*inbox.get(timeout=RELEASE_WAIT))
            except queue.Empty:
                break
            except BaseException:  # noqa: S112 - an error after the reader left: ignored
                continue


async def aread(
    scheduler: Scheduler,
    submit: Callable[[Sink], Request],
    on_progress: OnProgress | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """Submit a request and yield its events on the running asyncio loop (`on_progress`
    as in `read`, on the loop).
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled: list[Request] = []

    def post(kind: str, item: Any) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, (kind, item))
        except RuntimeError:  # the loop has closed: nobody is reading any more
            for request in cancelled:
                request.cancelled.set()

    request = submit(post)
    cancelled.append(request)
    state = _Messages(on_progress)
    try:
        while not state.done:
            event = state.take(*await inbox.get())
            if event is not None:
                yield event
    finally:
        request.cancelled.set()
        scheduler.wake()
        while not state.released:
            try:
                state.take(*await asyncio.wait_for(inbox.get(), RELEASE_WAIT))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                break
            except BaseException:  # noqa: S112 - an error after the reader left: ignored
                continue
