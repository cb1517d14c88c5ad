"""Fields of `/proc/<pid>/status` (Linux), for the benchmarks that measure memory: `bench
--load` reads its own process, `bench --soak` the server it started.
"""

from __future__ import annotations


def status_field(field: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status as its number: kB for memory fields (`VmRSS`, `VmHWM`,
    `RssAnon`, `RssFile`), a count for `Threads`.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field} (this benchmark needs Linux)")


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/PID/status in MiB."""
    return status_field(field, pid) / 1024
