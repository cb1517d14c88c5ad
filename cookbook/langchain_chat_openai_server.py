"""LangChain's `ChatOpenAI` against `deepen serve`: one process holds the ensemble, any
OpenAI-compatible client uses it.

Usually you start the server yourself and point clients at it:

    deepen serve --port 8000                      # terminal 1 (binds 127.0.0.1)
    ChatOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", model="deepen")

This script does both: it starts `deepen serve` on a free port as a subprocess, waits until
`/health` says the members are loaded, then runs a chat prompt through `ChatOpenAI`
(whole, streamed, and three at once with `batch`, which the server batches together), and
stops the server. With `DEEPEN_BASE_URL=http://HOST:PORT` set, it talks to that running
server instead of starting one (the integration tier points it at its own server).

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_chat_openai_server.py`
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(url: str, server: subprocess.Popen[bytes], seconds: float = 600) -> None:
    """Poll `/health` until the members are loaded (it answers 503 while they load)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"deepen serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health") as reply:
                print("server ready:", json.loads(reply.read()))
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise RuntimeError("deepen serve did not become ready in time")


def main() -> None:
    """Start the server (unless `DEEPEN_BASE_URL` names one), chat through ChatOpenAI, stop
    the server.
    """
    if os.environ.get("DEEPEN_BASE_URL"):
        chat_through(os.environ["DEEPEN_BASE_URL"].rstrip("/"))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepen_engine.commands.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]  # fmt: skip
    )
    try:
        wait_until_ready(url, server)
        chat_through(url)
    finally:
        server.terminate()
        server.wait(timeout=60)


def chat_through(url: str) -> None:
    """A chat prompt through ChatOpenAI at `url`: whole, streamed, and batched."""
    chat = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="deepen", max_tokens=24)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer in one short sentence."), ("human", "What is {thing}?")]
    )
    chain = prompt | chat
    print("invoke:", chain.invoke({"thing": "the capital of France"}).content)
    print("stream:", end=" ")
    for chunk in chain.stream({"thing": "a cat"}):
        print(chunk.content, end="", flush=True)
    print()
    things = [{"thing": "the sun"}, {"thing": "a river"}, {"thing": "bread"}]
    for thing, answer in zip(things, chain.batch(things)):  # sent at once, batched
        print(f"batch {thing['thing']}:", answer.content)
    print("OK")


if __name__ == "__main__":
    main()
