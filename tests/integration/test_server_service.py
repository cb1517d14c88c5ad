"""`deepen serve` as a real process on the default members, driven by the real `openai`
client: strict parameters named in `param`, `/metrics`, and SIGTERM during 8 streaming
requests (all 8 finish, new requests get 503, the process exits 0).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `deepen serve` process on the default members: `(url, process, log path)`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deepen_engine.commands.cli", "serve", "--port", str(port)]
            + ["--shutdown-timeout", "120"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()
    yield url, process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokenz": 3}, "max_tokenz"),
        ({"eta": -1}, "eta"),
        ({"fusion_top_k": 0}, "fusion_top_k"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
            "response_format",
        ),
    ],
)
def test_the_openai_client_gets_the_bad_parameter_named(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=2, extra_body=extra
        )
    error = info.value.body
    assert error["param"] == param
    assert "Config" not in error["message"]


def test_metrics_and_the_request_id(served, client):
    url = served[0]
    before = httpx.get(url + "/metrics").text
    reply = client.chat.completions.with_raw_response.create(
        model="any", messages=MESSAGES, max_tokens=4
    )
    assert reply.headers["x-request-id"].startswith("req-")
    tokens = reply.parse().usage.completion_tokens
    after = httpx.get(url + "/metrics").text

    def value(text: str, name: str) -> float:
        line = next((x for x in text.splitlines() if x.startswith(name + " ")), f"{name} 0")
        return float(line.rsplit(" ", 1)[1])

    grew = value(after, "deepen_generation_tokens_total") - value(
        before, "deepen_generation_tokens_total"
    )
    assert grew == tokens
    assert after.count("deepen_member_forward_seconds_total{member=") == 2
    fusion = value(after, "deepen_fusion_seconds_total") - value(
        before, "deepen_fusion_seconds_total"
    )
    assert fusion > 0  # the request's steps were fused (the default pair, the gate off)


def test_sigterm_during_8_streams_finishes_them_and_exits_0(served, client):
    url, process, log = served
    started = threading.Barrier(9)
    results: list[str | None] = [None] * 8

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=24, stream=True
        )
        text, first = "", True
        for chunk in chunks:
            if first:
                first = False
                started.wait(timeout=300)
            if chunk.choices and chunk.choices[0].finish_reason:
                results[i] = text + "|" + chunk.choices[0].finish_reason
            elif chunk.choices:
                text += chunk.choices[0].delta.content or ""

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=300)  # every stream has its first chunk
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES})
    for t in threads:
        t.join(timeout=300)
    code = process.wait(timeout=180)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"]
    assert all(r is not None for r in results), results
    assert len(set(results)) == 1  # same greedy request: same answer, all 8 complete
    assert code == 0, log.read_text()
    assert "drained" in log.read_text()
