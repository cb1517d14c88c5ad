"""`deepen bench --soak`: a bounded load-and-fault run against a `deepen serve` process it
starts on loopback (127.0.0.1 only), then the checks a team needs before running it.

1. Start `deepen serve` with the bench's members on a free loopback port; wait for
   `/health`.
2. Load: `--soak-clients` clients for `--soak-seconds`, each sending one request after
   another, drawn (seeded by `--seed`): a `--soak-malformed` share of malformed bodies
   (soak_faults.py, 20+ kinds, each with the status it must get), a `--soak-disconnect`
   share of streams the client drops after the first chunk, a `--soak-timeouts` share of
   requests with a `timeout` too short to finish (408), and the rest well-formed: chat or
   completion, tools or a JSON schema, streamed or not, all greedy.
3. Settle: wait until the server has nothing running or waiting; read `/metrics`.
4. Check: every answer equals the same request sent alone afterwards (greedy); no status
   but the expected one (so no 5xx); the server's RSS growth after the warm-up (the first
   third of the run: the median RSS of the last third against the middle third's, as one
   sample swings with the rows in flight) within `--soak-rss-limit` percent; the metrics'
   counts equal what the clients saw (generated tokens: at least the clients' usage, and at
   most that plus `--soak-tokens` per dropped stream, which the server may have finished
   unseen); nothing left running; SIGTERM drains and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from ...errors import ConfigError
from .proc_status import status_field, status_mb
from .soak_faults import COMPLETIONS, MALFORMED, good_request
from .soak_report import Seen, report


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, load it, check it, stop it: the soak's figures and checks."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="deepen-soak-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "deepen_engine.commands.cli", "serve", *_serve_args(args, port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        load_seconds = _wait_ready(server, url, log.name)
        before = _scrape(url)
        rss: list[tuple[float, float]] = []
        parts: list[list[float]] = []
        seen = asyncio.run(_load(args, url, server.pid, rss, parts))
        settled = _settle(url)
        after = _scrape(url)
        wrong = asyncio.run(_alone(url, seen))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    return report(
        args, seen, before, after, rss, settled, wrong, code, load_seconds, log.name, parts
    )


def _serve_args(args: argparse.Namespace, port: int) -> list[str]:
    out = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    out += ["--shutdown-timeout", "30", "--max-batch-size", str(args.max_batch_size)]
    for model in args.models or []:
        out += ["--model", model]
    for flag, value in (
        ("--device", getattr(args, "device", None)),
        ("--dtype", getattr(args, "dtype", None)),
        ("--min-anchors", getattr(args, "min_anchors", None)),
        ("--method", getattr(args, "method", None)),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(server: subprocess.Popen[bytes], url: str, log: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < 900:
        if server.poll() is not None:
            with open(log) as f:
                raise ConfigError(f"the soak's server exited ({server.returncode}):\n{f.read()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ConfigError(f"the soak's server did not become ready in 900 s (log: {log}).")


def _metric_values(text: str) -> dict[str, float]:
    """A /metrics page's samples: name (with its labels) -> value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _scrape(url: str) -> dict[str, float]:
    return _metric_values(httpx.get(url + "/metrics", timeout=30).text)


def _engine_state(text: str) -> list[float]:
    """From a /metrics page: rows running, requests waiting, KV cache MiB."""
    values = _metric_values(text)
    names = ("deepen_num_requests_running", "deepen_num_requests_waiting", "deepen_kv_cache_bytes")
    running, waiting, kv = (values.get(name, float("nan")) for name in names)
    return [running, waiting, round(kv / 2**20, 1)]


async def _load(
    args: argparse.Namespace,
    url: str,
    pid: int,
    rss: list[tuple[float, float]],
    parts: list[list[float]],
) -> Seen:
    seen = Seen()
    start = time.monotonic()
    deadline = start + args.soak_seconds

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, status_mb("VmRSS", pid)))
            if len(rss) % 10 == 1:
                anon, file = status_mb("RssAnon", pid), status_mb("RssFile", pid)
                threads = status_field("Threads", pid)
                engine = _engine_state((await http.get("/metrics", timeout=30)).text)
                parts.append([round(rss[-1][0]), round(anon, 1), round(file, 1), threads, *engine])
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=args.soak_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        clients = [_client(args, http, c, deadline, seen) for c in range(args.soak_clients)]
        await asyncio.gather(sample(), *clients)
    rss.append((time.monotonic() - start, status_mb("VmRSS", pid)))
    return seen


async def _client(
    args: argparse.Namespace, http: httpx.AsyncClient, c: int, deadline: float, seen: Seen
) -> None:
    rng = random.Random(args.seed * 1000 + c)
    while time.monotonic() < deadline:
        try:
            await _one(args, http, rng, seen)
        except httpx.TransportError as exc:  # no reply in the client's timeout: a finding
            seen.unexpected.append(f"client {c}: {type(exc).__name__} {exc}".strip())


async def _one(
    args: argparse.Namespace, http: httpx.AsyncClient, rng: random.Random, seen: Seen
) -> None:
    """One request of a client, drawn by `rng` (module docstring, step 2)."""
    draw = rng.random()
    if draw < args.soak_malformed:
        path, body, wanted = MALFORMED[rng.randrange(len(MALFORMED))]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await http.post(path, content=content)
        seen.status("malformed", path, reply.status_code, wanted)
        return
    kind = args.soak_kinds[rng.randrange(len(args.soak_kinds))]
    path, body = good_request(kind, rng.randrange(8), args.soak_tokens)
    draw -= args.soak_malformed
    if draw < args.soak_disconnect:
        await _disconnect(http, path, body, seen)
    elif draw < args.soak_disconnect + args.soak_timeouts:
        reply = await http.post(path, json={**body, "max_tokens": 64, "timeout": 0.001})
        seen.status("timeout", path, reply.status_code, 408)
    elif rng.random() < 0.5:
        await _plain(http, path, body, seen)
    else:
        await _streamed(http, path, body, seen)


def request_key(path: str, body: dict[str, Any]) -> str:
    """The key a request's answers are kept under, and what `_alone` sends again: the body
    in the order it was sent. Not `sort_keys`: a JSON schema's properties are written in
    their order (docs/constraints.md), so a sorted replay asks another question (it turned
    `{"name": ..., "age": ...}` into `{"age": ..., "name": ...}`, a false wrong answer).
    """
    return json.dumps([path, body])


def _answer(path: str, choice: dict[str, Any]) -> str:
    if path == COMPLETIONS:
        return str(choice["text"])
    message = choice["message"]
    calls = [c["function"] for c in message.get("tool_calls") or []]
    return json.dumps([message.get("content") or "", calls])


async def _plain(http: httpx.AsyncClient, path: str, body: dict[str, Any], seen: Seen) -> None:
    reply = await http.post(path, json=body)
    if not seen.status("plain", path, reply.status_code, 200):
        return
    data = reply.json()
    seen.completion_tokens += data["usage"]["completion_tokens"]
    seen.choices += len(data["choices"])
    seen.answers.setdefault(request_key(path, body), set()).add(_answer(path, data["choices"][0]))


async def _streamed(http: httpx.AsyncClient, path: str, body: dict[str, Any], seen: Seen) -> None:
    wire = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, calls, done = "", [], False
    async with http.stream("POST", path, json=wire) as reply:
        if not seen.status("streamed", path, reply.status_code, 200):
            return
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    seen.unexpected.append(f"streamed {path}: error {chunk['error']}")
                if chunk.get("usage"):
                    seen.completion_tokens += chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    seen.choices += choice["finish_reason"] is not None
                    if path == COMPLETIONS:
                        text += choice["text"]
                    else:
                        text += choice["delta"].get("content") or ""
                        calls += [c["function"] for c in choice["delta"].get("tool_calls", [])]
    if not done:
        seen.unexpected.append(f"streamed {path}: no [DONE]")
    answer = text if path == COMPLETIONS else json.dumps([text, calls])
    seen.answers.setdefault(request_key(path, body), set()).add(answer)


async def _disconnect(http: httpx.AsyncClient, path: str, body: dict[str, Any], seen: Seen) -> None:
    async with http.stream("POST", path, json={**body, "stream": True}) as reply:
        seen.status("disconnect", path, reply.status_code, 200)
        async for _ in reply.aiter_lines():
            break  # leave after the first chunk: the connection closes


def _settle(url: str) -> float:
    """Seconds until the server has nothing running or waiting (-1: not within 60 s)."""
    start = time.monotonic()
    while time.monotonic() - start < 60:
        m = _scrape(url)
        if m["deepen_num_requests_running"] == 0 and m["deepen_num_requests_waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    return -1.0


async def _alone(url: str, seen: Seen) -> list[str]:
    """The requests whose answers under load differ from the request sent alone."""
    wrong = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for key, answers in seen.answers.items():
            path, body = json.loads(key)
            reply = await http.post(path, json=body)
            alone = _answer(path, reply.json()["choices"][0])
            if answers != {alone}:
                wrong.append(f"{key}: under load {sorted(answers)}, alone {alone!r}")
    return wrong
