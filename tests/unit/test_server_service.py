"""The server as a service: structured errors, strict bodies, metrics, request ids, the API
page and the graceful drain (server/metrics.py, state.py, runner.py, openapi.py, schema.py).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from deepen_engine import Ensemble, FusionConfig, GenerationConfig, MemberSpec
from deepen_engine.commands.options import command_line_error
from deepen_engine.errors import ConfigError
from deepen_engine.server import create_app
from deepen_engine.server.schema import CHAT_FIELDS, COMPLETION_FIELDS
from tests.conftest import running_server

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# --- ConfigError carries its field ------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field", "owner"),
    [
        (lambda: FusionConfig(eta=-1), "eta", "FusionConfig"),
        (lambda: FusionConfig(top_k=0), "top_k", "FusionConfig"),
        (lambda: FusionConfig(main=3).check_members(2), "main", "FusionConfig"),
        (lambda: FusionConfig(weights=[1.0]).normalised_weights(2), "weights", "FusionConfig"),
        (lambda: GenerationConfig(max_new_tokens=2, min_new_tokens=5), "min_new_tokens", None),
        (lambda: GenerationConfig(json_schema={"type": "x"}), "json_schema", None),
        (lambda: GenerationConfig(regex="a", grammar="start: 'a'"), "grammar", None),
        (lambda: GenerationConfig(stop=[""]), "stop", None),
        (lambda: GenerationConfig(temperatur=1), "temperatur", None),
    ],
)
def test_a_config_error_names_its_field_as_data(make, field, owner):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field
    assert info.value.owner == (owner or "GenerationConfig")
    assert str(info.value).startswith(info.value.owner)  # the Python message is unchanged
    assert info.value.reason and "Config" not in info.value.reason  # for other names


def test_the_command_line_names_the_flag_from_the_field():
    from deepen_engine.commands.cli import build_parser

    build_parser()  # registers the flags
    with pytest.raises(ConfigError) as info:
        FusionConfig(eta=-1)
    assert command_line_error(info.value) == (
        "--eta: Input should be greater than or equal to 0, got -1."
    )
    with pytest.raises(ConfigError) as info:
        GenerationConfig(max_new_tokens=0)
    assert command_line_error(info.value).startswith("--max-new-tokens: Input should be")


# --- strict bodies and the documented fields -----------------------------------------------


def test_every_documented_field_is_accepted(server):
    body = {
        "model": "any",
        "messages": MESSAGES,
        "max_completion_tokens": 2,
        "user": "u",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "method": "deepen",
        "eta": 0.15,
        "steps": 5,
        "fusion_top_k": 64,
        "gate": "off",
        "weighting": "fixed",
        "truncation": "error",
        "timeout": 60,
        "top_k": 0,
        "min_tokens": 0,
    }
    assert set(body) <= CHAT_FIELDS
    reply = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    completion = {"prompt": "The capital of France is", "max_tokens": 2, "echo": False}
    assert set(completion) <= COMPLETION_FIELDS
    reply = httpx.post(server + "/v1/completions", json=completion, timeout=60)
    assert reply.status_code == 200, reply.text


def test_a_field_of_the_other_endpoint_is_unknown(server):
    reply = httpx.post(server + "/v1/completions", json={"prompt": "x", "messages": MESSAGES})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "messages"


# --- metrics, request ids, the API page ------------------------------------------------------


@pytest.fixture(scope="module")
def own_server(tiny_ensemble):
    """A server of its own, so that its metrics count only this module's requests."""
    with running_server(create_app(tiny_ensemble, model_name="tiny")) as url:
        yield url


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_add_up_to_what_the_clients_saw(own_server, tiny_ensemble):
    before = _metrics(own_server)
    reply = httpx.post(
        own_server + "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 5},
        headers={"x-request-id": "my-id-1"},
        timeout=60,
    )
    assert reply.headers["x-request-id"] == "my-id-1"
    usage = reply.json()["usage"]
    reason = reply.json()["choices"][0]["finish_reason"]
    with httpx.stream(
        "POST",
        own_server + "/v1/completions",
        json={"prompt": "The river", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as streamed:
        assert re.fullmatch(r"req-[0-9a-f]{16}", streamed.headers["x-request-id"])
        chunks = [json.loads(x[6:]) for x in streamed.iter_lines() if x.startswith("data: {")]
    streamed_reason = chunks[-1]["choices"][0]["finish_reason"]
    bad = httpx.post(own_server + "/v1/chat/completions", json={"messages": MESSAGES, "x": 1})
    assert bad.status_code == 400 and bad.headers["x-request-id"]
    after = _metrics(own_server)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("deepen_prompt_tokens_total") >= usage["prompt_tokens"] + 1
    assert grew("deepen_generation_tokens_total") == usage["completion_tokens"] + 4
    assert grew(f'deepen_request_success_total{{finish_reason="{reason}"}}') >= 1
    reasons = {reason, streamed_reason}
    assert sum(grew(f'deepen_request_success_total{{finish_reason="{r}"}}') for r in reasons) == 2
    assert grew('deepen_request_failure_total{reason="invalid"}') == 1
    assert grew('deepen_http_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert grew('deepen_http_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert grew('deepen_http_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert grew("deepen_time_to_first_token_seconds_count") == 2
    assert grew("deepen_time_per_output_token_seconds_count") == 2
    assert grew("deepen_request_queue_time_seconds_count") == 2
    assert grew("deepen_e2e_request_latency_seconds_count") == 3
    assert grew('deepen_member_forward_seconds_total{member="tiny-llama"}') > 0
    assert grew('deepen_member_forward_seconds_total{member="tiny-gemma"}') > 0
    assert grew("deepen_fused_steps_total") >= 9  # every row-step asks for fusion (gate off)
    assert (
        0
        < grew("deepen_fusion_seconds_total")
        == pytest.approx(
            tiny_ensemble.fuser.context.fusion_seconds - before["deepen_fusion_seconds_total"]
        )
    )
    names = [m.name for m in tiny_ensemble.members]
    cached = [after[f'deepen_relative_rows_cached{{member="{n}"}}'] for n in names]
    assert cached == tiny_ensemble.fuser.context.rows_cached() and sum(cached) > 0
    assert after["deepen_gated_steps_total"] <= after["deepen_fused_steps_total"]
    assert after["deepen_num_requests_running"] == 0
    assert after["deepen_num_requests_waiting"] == 0
    assert after["deepen_kv_cache_bytes"] == 0  # nothing running: no cache held


def test_the_gate_shows_in_the_gated_steps(own_server):
    before = _metrics(own_server)
    body = {"messages": MESSAGES, "max_tokens": 4, "gate": "confident", "gate_threshold": 1e-9}
    tokens = httpx.post(own_server + "/v1/chat/completions", json=body, timeout=60).json()
    after = _metrics(own_server)
    gated = after["deepen_gated_steps_total"] - before["deepen_gated_steps_total"]
    fused = after["deepen_fused_steps_total"] - before["deepen_fused_steps_total"]
    # a threshold near 0: the main member is always sure enough, every step is gated
    assert gated == fused == tokens["usage"]["completion_tokens"]


def test_openapi_is_generated_from_the_request_models(own_server):
    doc = httpx.get(own_server + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert set(schemas["ChatRequest"]["properties"]) == CHAT_FIELDS
    assert set(schemas["CompletionRequest"]["properties"]) == COMPLETION_FIELDS
    assert schemas["ChatRequest"]["additionalProperties"] is False
    assert schemas["ChatRequest"]["required"] == ["messages"]
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"
    }
    page = httpx.get(own_server + "/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert "<td>fusion_top_k</td>" in page.text and "<td>max_completion_tokens</td>" in page.text


# --- graceful shutdown ---------------------------------------------------------------------


def _stream_text(url: str, results: list[str], max_tokens: int = 48) -> None:
    body = {"prompt": "The river runs", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
        lines = [x for x in reply.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    results.append("".join(c["choices"][0]["text"] for c in chunks))


def test_a_drain_refuses_new_requests_and_finishes_those_in_flight(tiny_pair):
    import uvicorn

    from deepen_engine.server.runner import DrainingServer

    members = [MemberSpec(source=tiny_pair[0], name="a"), MemberSpec(source=tiny_pair[1], name="b")]
    ens = Ensemble(members, min_anchors=50)
    app = create_app(load=lambda: ens, close_at_shutdown=True)
    state = app.state.deepen
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), shutdown_timeout=60)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    alone: list[str] = []
    _stream_text(url, alone)
    # While the gate is shut, member a's forward waits: the three streams stay in flight
    # until after SIGTERM whatever the machine's load (short streams on the tiny members
    # could otherwise finish before the signal, and the drain would have nothing to wait for).
    # The hook is on the model's body: the engine runs a supported member's body and its own
    # output layer, never the model's top-level forward (members/output_layer.py).
    gate = threading.Event()

    def hold(*_: object) -> None:  # a pre-hook that returns None leaves the inputs alone
        gate.wait(timeout=120)

    hook = ens.members[0].model.model.register_forward_pre_hook(hold)
    results: list[str] = []
    clients = [threading.Thread(target=_stream_text, args=(url, results)) for _ in range(3)]
    for c in clients:
        c.start()
    while state.in_flight < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    in_flight_at_sigterm = state.in_flight
    state.enter()  # one more in flight, held until the checks below are done
    server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    refused = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
    health = httpx.get(url + "/health")
    gate.set()
    state.leave()
    for c in clients:
        c.join(timeout=120)
    thread.join(timeout=60)
    hook.remove()
    assert in_flight_at_sigterm == 3
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert results == alone * 3  # every stream in flight finished, greedy: same text
    assert not thread.is_alive() and state.in_flight == 0
    with pytest.raises(ConfigError, match="closed"):  # the lifespan freed the members
        ens.generate("x", max_new_tokens=1)
    sock.close()


def test_a_drain_past_its_timeout_stops_anyway(tiny_ensemble):
    app = create_app(tiny_ensemble)
    state = app.state.deepen
    state.enter()  # a request that never ends
    state.begin_drain(0.05)
    assert state.draining and not state.drained()
    time.sleep(0.1)
    assert state.drained()
    with pytest.raises(Exception, match="shutting down"):
        state.enter()
