"""One OpenMP thread pool at a time: a thread frees its idle pool before another thread's
torch work runs.

torch's CPU build runs its parallel operations on GNU OpenMP (libgomp), which gives every
thread that starts a parallel region a pool of worker threads of its own, kept until that
thread exits. Once the pools' threads outnumber the CPUs, libgomp stops letting idle
workers spin at the end of a region ("throttled" waiting), so every later region of every
pool first waits for its workers to wake. The ensemble decodes on its scheduler thread,
while the thread that loaded the members (or measured them) still holds a pool: on the
default pair, 2 cores, a decoding step at batch 8 took 239 ms on a second thread with the
main thread's pool alive against 186 ms after freeing it (`python scripts/openmp_pools.py`,
docs/benchmarks.md "One OpenMP pool at a time").

`release_thread_pool` frees the calling thread's pool (libgomp's `omp_pause_resource_all`
frees the calling thread's pool only, and returns at once when it has none); that thread's
next parallel region starts a new one, which costs well under a millisecond. The scheduler
calls it in every thread that submits a request, and in its own thread when it goes idle,
so the thread that decodes holds the only pool. Nothing happens where torch does not run on
libgomp (another OpenMP runtime, or not Linux).

`hand_over` and `follow_thread_count` carry the submitting thread's torch thread count to
the scheduler's thread: torch applies `torch.set_num_threads` to the calling thread (and
to threads that have not run parallel work yet), so without them a scheduler thread
started earlier kept the count it first saw.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch  # (also loads its libgomp, which `_pause` finds in the process's maps)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t; libgomp treats both kinds alike


@functools.cache
def _pause() -> Callable[[int], int] | None:
    """The `omp_pause_resource_all` of the libgomp torch loaded, or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:  # not Linux
        return None
    # torch's own copy first, where another package brings a second one
    for path in sorted(paths, key=lambda p: "torch" not in p):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        return pause
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (libgomp only). Returns whether
    libgomp was there to ask (it frees nothing when the thread has no pool, or while the
    thread is inside a parallel region).
    """
    pause = _pause()
    if pause is None:
        return False
    pause(OMP_PAUSE_SOFT)
    return True


def hand_over() -> int:
    """For a thread handing torch work to another: free its pool (`release_thread_pool`)
    and return its torch thread count, for the other thread to `follow_thread_count`.
    """
    release_thread_pool()
    return torch.get_num_threads()


def follow_thread_count(threads: int) -> None:
    """Run this thread's torch work on `threads` intra-op threads (0: leave it as it is)."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
