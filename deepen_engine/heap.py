"""glibc's `malloc_trim`: giving the C heap's free pages back to the system. Used after a
tokenizer loads (members/loading.py) and on a timer by `deepen serve` (server/memory.py).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

MALLOC_TRIM_INTERVAL = 10.0
"""Default seconds between two `malloc_trim(0)` calls of `deepen serve` (server/memory.py)."""


@functools.cache
def glibc_malloc_trim() -> Callable[[], object] | None:
    """Glibc's `malloc_trim(0)` as a function of no argument; None where malloc is not
    glibc's (macOS, musl). Looked up among the process's own symbols: with jemalloc or
    tcmalloc preloaded this is still glibc's, which then trims glibc's unused arenas.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system now (nothing without glibc)."""
    trim = glibc_malloc_trim()
    if trim is not None:
        trim()
