"""Handing the memory glibc's malloc holds free back to the system, every few seconds.

Why (issue 23's soak): on the CPU, torch allocates every tensor with malloc, and a
decoding step frees and allocates tens of MiB of them in shapes that change with every row
that joins or leaves (the KV caches are re-concatenated each step, logits are batch x
vocabulary). glibc keeps what is freed in its arenas, one per thread that allocates, and
gives memory back to the system only from the top of a heap, past `M_TRIM_THRESHOLD`
(which rises with the largest block freed, up to 64 MiB), so under continuous load the
free memory it holds grows. (The soak's steady growth, 2 GiB in 14 minutes, had another
cause, fixed in the scheduler: finished requests sat in reference cycles until a full
garbage collection; docs/benchmarks.md "Soak".)

`malloc_trim(0)` (glibc >= 2.8) releases the free pages in the middle of every arena too
(`madvise(MADV_DONTNEED)`), so a thread calling it every `interval` seconds bounds the free
memory held to what one interval's allocations leave behind. It does not bound what the
server holds live: under the soak's load, memory in flight rises with the number of rows
prefilled together, which grows during a run (docs/benchmarks.md, "Soak"). A call takes
about 10 to 100 ms under load, on this thread: the decoding thread waits only when it
allocates in the arena being trimmed at that moment; the pages given back are faulted in
again when reused.

Where malloc is not glibc's (macOS, musl), there is no `malloc_trim` and this does nothing.
A process started with another allocator preloaded (jemalloc, tcmalloc) still finds
glibc's `malloc_trim`, which then trims glibc's unused arenas: harmless, and no help.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..heap import MALLOC_TRIM_INTERVAL, glibc_malloc_trim

log = logging.getLogger("deepen.server")


class MallocTrimmer:
    """A daemon thread calling `trim` (default: glibc's `malloc_trim(0)`) every `interval`
    seconds from `start()` until `stop()`. `interval <= 0`, or no `trim` to call: nothing.
    """

    def __init__(
        self, interval: float = MALLOC_TRIM_INTERVAL, trim: Callable[[], object] | None = None
    ) -> None:
        self.interval = interval
        self._trim = trim if trim is not None else glibc_malloc_trim()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.trims = 0  # calls made so far

    def start(self) -> bool:
        """Start the thread; False (and nothing started) when there is nothing to do."""
        if self.interval <= 0 or self._trim is None or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name="deepen-malloc-trim", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the thread and wait for it (a call in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        while not self._stop.wait(self.interval):
            try:
                trim()
            except Exception:  # never let the trimmer take the server down
                log.exception("deepen serve: malloc_trim failed; no more trimming")
                return
            self.trims += 1
