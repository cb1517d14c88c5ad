"""What a `deepen bench --soak` run saw and how it is judged (soak.py runs it): the
clients' counts (`Seen`), the checks against the server's metrics and memory, the figures
for `--json`, and the short table.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .soak_faults import COMPLETIONS, MALFORMED


@dataclass
class Seen:
    """What the clients saw."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    answers: dict[str, set[str]] = field(default_factory=dict)  # request_key -> answers seen
    completion_tokens: int = 0
    choices: int = 0

    def status(self, kind: str, path: str, got: int, wanted: int) -> bool:
        """Count a reply; False (and noted) when its status is not the one wanted."""
        self.statuses[(path, got)] += 1
        self.kinds[kind] += 1
        if got != wanted:
            self.unexpected.append(f"{kind} {path}: {got}, expected {wanted}")
        return got == wanted


def _kind_of(key: str) -> str:
    """The well-formed kind (soak_faults.SOAK_KINDS) of a `request_key`."""
    path, body = json.loads(key)
    if path == COMPLETIONS:
        return "completion"
    return "json_schema" if "response_format" in body else "tools" if "tools" in body else "chat"


def report(
    args: argparse.Namespace,
    seen: Seen,
    before: dict[str, float],
    after: dict[str, float],
    rss: list[tuple[float, float]],
    settled: float,
    wrong: list[str],
    code: int,
    load_seconds: float,
    log: str,
    parts: list[list[float]],
) -> dict[str, Any]:
    """The soak's figures and checks (module docstring of soak.py, step 4) for `--json`."""

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def http(path: str, status: int) -> float:
        return grew(f'deepen_http_requests_total{{endpoint="{path}",status="{status}"}}')

    warm = [mb for t, mb in rss if t >= args.soak_seconds / 3] or [rss[-1][1]]
    thirds = _thirds(rss, args.soak_seconds)
    middle, last = (thirds[1], thirds[2]) if thirds[1] and thirds[2] else (warm[0], rss[-1][1])
    growth = 100.0 * (last - middle) / middle if middle else 0.0
    successes = sum(v for k, v in after.items() if k.startswith("deepen_request_success_total"))
    successes -= sum(v for k, v in before.items() if k.startswith("deepen_request_success_total"))
    aborted = grew('deepen_request_failure_total{reason="aborted"}')
    answered = seen.kinds["plain"] + seen.kinds["streamed"] + seen.kinds["disconnect"]
    statuses = {f"{p} {s}": n for (p, s), n in sorted(seen.statuses.items())}
    metric_status = all(http(p, s) == n for (p, s), n in seen.statuses.items())
    checks = {
        "wrong_answers": {"value": len(wrong), "limit": 0},
        "unexpected_statuses": {"value": len(seen.unexpected), "limit": 0},
        "rss_growth_percent": {"value": round(growth, 2), "limit": args.soak_rss_limit},
        # a stream dropped after the server finished it counts tokens no client saw
        "metrics_generation_tokens": {
            "value": grew("deepen_generation_tokens_total"),
            "range": [
                seen.completion_tokens,
                seen.completion_tokens + seen.kinds["disconnect"] * args.soak_tokens,
            ],
        },
        "metrics_http_statuses": {"value": metric_status, "expected": True},
        "metrics_finished_or_aborted": {"value": successes + aborted, "expected": answered},
        "left_running_or_waiting": {"value": settled < 0, "expected": False},
        "exit_code_after_sigterm": {"value": code, "expected": 0},
    }
    for check in checks.values():
        if "limit" in check:
            check["ok"] = check["value"] <= check["limit"]
        elif "range" in check:
            check["ok"] = check["range"][0] <= check["value"] <= check["range"][1]
        else:
            check["ok"] = check["value"] == check["expected"]
    return {
        "soak": {
            "clients": args.soak_clients,
            "seconds": args.soak_seconds,
            "shares": {
                "malformed": args.soak_malformed,
                "disconnect": args.soak_disconnect,
                "timeouts": args.soak_timeouts,
            },
            "kinds": list(args.soak_kinds),
            "malformed_kinds": len(MALFORMED),
            "server_ready_seconds": round(load_seconds, 1),
            "requests": dict(seen.kinds),
            "statuses": statuses,
            "distinct_answers_checked": len(seen.answers),
            "answers_checked_by_kind": dict(Counter(_kind_of(key) for key in seen.answers)),
            "completion_tokens": seen.completion_tokens,
            "rss_mb": {"warm": round(warm[0], 1), "end": round(rss[-1][1], 1)},
            # the median of each third (one sample is noisy: rows in flight come and go)
            "rss_mb_thirds": thirds,
            # every 10th sample (one a second): is growth warm-up that levels off, or a leak?
            "rss_mb_series": [[round(t), round(mb, 1)] for t, mb in rss[::10] + rss[-1:]],
            # every 10 s: seconds, the anonymous and file-backed parts of RSS (MiB), threads,
            # rows running, requests waiting, the running rows' KV caches (MiB)
            "rss_anon_file_mb_series": parts,
            "relative_rows_cached": {
                k: v for k, v in after.items() if k.startswith("deepen_relative_rows_cached")
            },
            "settle_seconds": round(settled, 2),
            "checks": checks,
            "passed": all(c["ok"] for c in checks.values()),
            "unexpected": seen.unexpected[:20],
            "wrong": wrong[:10],
            "server_log": log,
        }
    }


def _thirds(rss: list[tuple[float, float]], seconds: float) -> list[float | None]:
    """The median RSS (MiB) of the samples in each third of the load (None: no sample)."""
    out: list[float | None] = []
    for third in range(3):
        low, high = third * seconds / 3, (third + 1) * seconds / 3
        mbs = sorted(mb for t, mb in rss if low <= t < high or (third == 2 and t >= high))
        out.append(round(mbs[len(mbs) // 2], 1) if mbs else None)
    return out


def print_soak(figures: dict[str, Any]) -> None:
    """The soak as a short table."""
    soak = figures["soak"]
    print(f"deepen bench --soak: {soak['clients']} clients for {soak['seconds']} s")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(soak["requests"].items())))
    for name, check in soak["checks"].items():
        bound = check.get("limit", check.get("range", check.get("expected")))
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {name}: {check['value']} ({bound})")
    for line in soak["unexpected"] + soak["wrong"]:
        print(f"  - {line}")
    print("passed" if soak["passed"] else "FAILED", f"(server log: {soak['server_log']})")
