"""Is the server's RSS growth under the soak warm-up or a leak? (issue 23)

    HF_HUB_OFFLINE=1 python scripts/soak_memory.py [--rounds 8] [--json out.json]
    HF_HUB_OFFLINE=1 python scripts/soak_memory.py --phase-seconds 60 --clients 64
    HF_HUB_OFFLINE=1 python scripts/soak_memory.py --model A --model B --min-anchors 50

Serves the members (default: the default pair) in this process (`create_app`, uvicorn in a
thread, loopback) and sends the same round of requests again and again: every well-formed
soak request (soak_faults.py: 4 chat, 4 completion, 3 tools and 1 `json_schema`, each
plain and streamed), `--drops` streams dropped after their first chunk and `--malformed`
malformed bodies, all at once. With `--phase-seconds`, each round is instead a phase of
`deepen bench --soak`'s own load (`--clients` clients for that many seconds, its default
shares of malformed bodies, dropped streams and timeouts; seed = the round), so rows join
and leave a running batch as they do in the soak. After each round, once nothing runs,
`gc.collect()` and:

- `rss_mb`: resident memory (/proc/self/status VmRSS);
- `tensor_mb`, `tensors`: the torch tensors the garbage collector can reach (bytes of their
  storages, each storage once), and `objects`: every object it tracks;
- `traced_mb`: Python's own allocations (`tracemalloc`, started after the load; torch's
  tensor memory is not in it);
- `trimmed_mb`: RSS after glibc's `malloc_trim(0)`, which returns the free memory the
  allocator holds to the system.

The same work every round: a leak grows the live figures (tensors, objects, traced, the
trimmed RSS) round after round; warm-up and allocator caching grow `rss_mb` only, and
`malloc_trim` gives it back.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import random
import socket
import threading
import time
import tracemalloc
import warnings
from typing import Any

import httpx
import torch
import uvicorn

from deepen_engine import Ensemble, MemberSpec
from deepen_engine.commands.bench.soak import _disconnect, _load, _plain, _streamed
from deepen_engine.commands.bench.soak_faults import MALFORMED, SOAK_KINDS, good_request
from deepen_engine.commands.bench.soak_report import Seen
from deepen_engine.commands.bench.timing import rss_mb
from deepen_engine.commands.cli import build_parser
from deepen_engine.server import create_app

_VARIANTS = {"chat": 4, "completion": 4, "tools": 3, "json_schema": 1}


def _live() -> dict[str, float]:
    """What the garbage collector can reach: objects, tensors and their storages' bytes."""
    gc.collect()
    objects = gc.get_objects()
    storages: dict[int, int] = {}
    tensors = 0
    with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        found = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    for obj in found:
        if not obj.is_meta:
            tensors += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return {
        "objects": len(objects),
        "tensors": tensors,
        "tensor_mb": round(sum(storages.values()) / 2**20, 1),
    }


async def _round(url: str, args: argparse.Namespace, r: int) -> Seen:
    """One round: every well-formed request plain and streamed, drops and malformed."""
    seen = Seen()
    rng = random.Random(r)
    jobs = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        for kind in SOAK_KINDS:
            for i in range(_VARIANTS[kind]):
                path, body = good_request(kind, i, args.tokens)
                jobs += [_plain(http, path, body, seen), _streamed(http, path, body, seen)]
        for _ in range(args.drops):
            kind = SOAK_KINDS[rng.randrange(len(SOAK_KINDS))]
            path, body = good_request(kind, rng.randrange(8), args.tokens)
            jobs.append(_disconnect(http, path, body, seen))
        for _ in range(args.malformed):
            path, bad, wanted = MALFORMED[rng.randrange(len(MALFORMED))]
            content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
            jobs.append(_malformed(http, path, content, wanted, seen))
        await asyncio.gather(*jobs)
    return seen


async def _malformed(
    http: httpx.AsyncClient, path: str, content: bytes, wanted: int, seen: Seen
) -> None:
    reply = await http.post(path, content=content)
    seen.status("malformed", path, reply.status_code, wanted)


def _phase(args: argparse.Namespace, r: int) -> argparse.Namespace:
    """The soak's load settings for phase `r`: `deepen bench --soak`'s own defaults (shares
    of malformed bodies, dropped streams and timeouts; kinds) with these clients, seconds,
    tokens and seed.
    """
    soak = build_parser().parse_args(["bench", "--soak"])
    soak.soak_clients, soak.soak_seconds = args.clients, args.phase_seconds
    soak.soak_tokens, soak.seed = args.tokens, r
    return soak


def _settle(ens: Ensemble) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = ens.queue_state()
        if not state.get("running_rows") and not state.get("waiting_requests"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not settle in 120 s: {ens.queue_state()}")


def main() -> None:
    """Serve the members here, run the rounds, print and save each round's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="member (repeat); default pair if none")
    parser.add_argument("--min-anchors", type=int)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=12, help="max_tokens per request (12)")
    parser.add_argument("--drops", type=int, default=8, help="dropped streams per round (8)")
    parser.add_argument("--malformed", type=int, default=8, help="bad bodies per round (8)")
    parser.add_argument("--phase-seconds", type=float, help="rounds: soak phases this long")
    parser.add_argument("--clients", type=int, default=64, help="--phase-seconds: clients (64)")
    parser.add_argument("--json", help="write the rounds here")
    args = parser.parse_args()

    fusion = {} if args.min_anchors is None else {"min_anchors": args.min_anchors}
    specs = [MemberSpec(source=m) for m in args.model] if args.model else None
    ens = Ensemble(specs, **fusion) if specs else Ensemble(**fusion)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(ens), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    libc = ctypes.CDLL("libc.so.6")
    tracemalloc.start()
    rounds: list[dict[str, Any]] = [
        {"round": 0, "rss_mb": round(rss_mb(), 1), **_live(), "seconds": 0.0}
    ]
    print(json.dumps(rounds[-1]), flush=True)
    try:
        for r in range(1, args.rounds + 1):
            start = time.monotonic()
            if args.phase_seconds:
                seen = asyncio.run(_load(_phase(args, r), url, os.getpid(), [], []))
            else:
                seen = asyncio.run(_round(url, args, r))
            _settle(ens)
            row: dict[str, Any] = {"round": r, "seconds": round(time.monotonic() - start, 1)}
            row["unexpected"] = seen.unexpected[:5]
            row["requests"] = sum(seen.kinds.values())
            row["distinct_answers"] = sum(len(a) > 1 for a in seen.answers.values())
            row["rss_mb"] = round(rss_mb(), 1)
            row.update(_live())
            row["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
            libc.malloc_trim(0)
            row["trimmed_mb"] = round(rss_mb(), 1)
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        ens.close()
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rounds": rounds}, out, indent=1)


if __name__ == "__main__":
    main()
