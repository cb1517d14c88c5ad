"""The OpenAI-compatible server on the tiny members, served by uvicorn on loopback and
driven by the real `openai` client (and raw HTTP for malformed bodies)."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("openai")

import httpx  # noqa: E402
import openai  # noqa: E402

from deepen_engine import Ensemble, MemberSpec, SchedulerConfig  # noqa: E402
from deepen_engine.server import create_app  # noqa: E402
from tests.conftest import IDLE, running_server, tiny_gemma3, tiny_llama  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


def _chat_expected(ens, **settings):
    return ens.with_fusion(main=ens.default_chat_main()).generate(MESSAGES, **settings)


def test_chat_completion_is_the_engines_answer(client, tiny_ensemble):
    reply = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12)
    expected = _chat_expected(tiny_ensemble, max_new_tokens=12)
    choice = reply.choices[0]
    assert choice.message.content == expected.text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == {"eos": "stop", "stop": "stop"}.get(
        expected.finish_reason, expected.finish_reason
    )
    assert reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    main = tiny_ensemble.members[tiny_ensemble.default_chat_main()].name
    assert reply.usage.model_dump() == {
        **expected.usage.token_counts(main),
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }


def test_streamed_chat_equals_the_whole_answer_with_a_usage_chunk(client):
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_one_choice_per_prompt_in_order(client, tiny_ensemble):
    prompts = [PROMPT, "def add(a, b):", "Once upon a time"]
    reply = client.completions.create(model="m", prompt=prompts, max_tokens=8)
    expected = [tiny_ensemble.generate(p, max_new_tokens=8).text for p in prompts]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == expected
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="m", prompt=prompts, max_tokens=8, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == expected


def test_sampling_settings_seed_and_extra_fusion_fields(client, tiny_ensemble):
    settings = dict(model="m", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    first = client.completions.create(**settings).choices[0].text
    assert first == client.completions.create(**settings).choices[0].text
    expected = tiny_ensemble.generate(
        PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3
    ).text
    assert first == expected
    alone = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=10, extra_body={"eta": 0}
    )
    union = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=10, extra_body={"method": "union"}
    )
    expected_union = tiny_ensemble.with_fusion(method="union").generate(PROMPT, max_new_tokens=10)
    assert union.choices[0].text == expected_union.text
    main_alone = tiny_ensemble.with_fusion(eta=0).generate(PROMPT, max_new_tokens=10).text
    assert alone.choices[0].text == main_alone


def test_chat_logprobs_come_from_the_fused_distribution(client, tiny_ensemble):
    reply = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    expected = _chat_expected(tiny_ensemble, max_new_tokens=6, logprobs=2).logprobs
    assert [(c.token, round(c.logprob, 5)) for c in content] == [
        (e.token, round(e.logprob, 5)) for e in expected
    ]
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server + "/health").json()
    assert health == {"status": "ok", "model": "tiny", **IDLE}


BAD_BODIES = [
    ("chat", [], None, "must be a JSON object"),
    ("chat", {}, "messages", "messages must be a non-empty list"),
    ("chat", {"messages": []}, "messages", "non-empty list"),
    ("chat", {"messages": "hi"}, "messages", "non-empty list"),
    ("chat", {"messages": ["hi"]}, "messages[0]", "must be an object"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0]",
        "text parts only",
    ),
    ("chat", {"messages": MESSAGES, "temperature": -1}, "temperature", "from 0 to 2"),
    ("chat", {"messages": MESSAGES, "temperature": "hot"}, "temperature", "a number"),
    ("chat", {"messages": MESSAGES, "top_p": 0}, "top_p", "(0, 1]"),
    ("chat", {"messages": MESSAGES, "top_p": 1.5}, "top_p", "from 0 to 1"),
    ("chat", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", ">= 1"),
    (
        "chat",
        {"messages": MESSAGES, "max_completion_tokens": 2.5},
        "max_completion_tokens",
        "integer",
    ),
    ("chat", {"messages": MESSAGES, "n": 2}, "n", "one choice"),
    ("chat", {"messages": MESSAGES, "stream": "yes"}, "stream", "true or false"),
    ("chat", {"messages": MESSAGES, "stop": [""]}, "stop", "non-empty string"),
    ("chat", {"messages": MESSAGES, "seed": "x"}, "seed", "integer"),
    ("chat", {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    (
        "chat",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 99},
        "top_logprobs",
        "0 to 20",
    ),
    ("chat", {"messages": MESSAGES, "presence_penalty": 1}, "presence_penalty", "not supported"),
    (
        "chat",
        {"messages": MESSAGES, "stream_options": {"include_usage": True}},
        "stream_options",
        "stream=true",
    ),
    ("chat", {"messages": MESSAGES, "eta": -1}, "eta", "eta: Input should be greater than or"),
    ("chat", {"messages": MESSAGES, "fusion_top_k": 0}, "fusion_top_k", "fusion_top_k: "),
    ("chat", {"messages": MESSAGES, "gate_threshold": 2}, "gate_threshold", "less than or"),
    (
        "chat",
        {"messages": MESSAGES, "max_tokens": 2, "min_tokens": 5},
        "min_tokens",
        "min_new_tokens (5) must not exceed",
    ),
    (
        "chat",
        {
            "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}},
        },
        "response_format",
        "json_schema cannot be compiled",
    ),
    ("chat", {"messages": MESSAGES, "max_tokenz": 3}, "max_tokenz", "did you mean 'max_tokens'"),
    ("completions", {"prompt": PROMPT, "temprature": 0}, "temprature", "Unrecognized request"),
    ("chat", {"messages": MESSAGES, "method": "vote"}, "method", "'deepen', 'union' or 'unite'"),
    ("chat", {"messages": MESSAGES, "main": 7}, "main", "out of range for 2 members"),
    ("chat", {"messages": MESSAGES, "weights": [1, 2, 3]}, "weights", "3 values for 2 members"),
    ("chat", {"messages": MESSAGES, "truncation": "right"}, "truncation", "'error' or 'left'"),
    (
        "chat",
        {"messages": MESSAGES, "response_format": {"type": "xml"}},
        "response_format",
        "'type'",
    ),
    ("completions", {"prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
    ("completions", {"prompt": ""}, "prompt", "empty"),
    ("completions", {}, "prompt", "a string or a non-empty list"),
    ("completions", {"prompt": PROMPT, "echo": True}, "echo", "not supported"),
    ("completions", {"prompt": PROMPT, "best_of": 3}, "best_of", "not supported"),
    ("completions", {"prompt": PROMPT, "logprobs": 9}, "logprobs", "0 to 5"),
    ("completions", {"prompt": "the river runs " * 400}, "prompt", "truncation='left'"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "message"), BAD_BODIES)
def test_malformed_or_out_of_range_bodies_get_a_400_naming_the_parameter(
    server, endpoint, body, param, message
):
    reply = httpx.post(
        f"{server}/v1/{endpoint if endpoint == 'completions' else 'chat/completions'}", json=body
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]
    assert "Config" not in error["message"]  # API names, never a Python class


def test_the_server_keeps_serving_after_bad_requests(server, client):
    assert httpx.post(server + "/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.get(server + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server + "/v1/chat/completions").status_code == 405
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).choices[0].text


def test_a_client_that_leaves_mid_stream_leaves_no_row(server, tiny_ensemble):
    body = {"prompt": PROMPT, "max_tokens": 500, "min_tokens": 500, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    _wait_idle(tiny_ensemble)
    assert tiny_ensemble.queue_state() == IDLE


def test_a_client_that_leaves_a_whole_request_leaves_no_row(server, tiny_ensemble):
    body = {"prompt": PROMPT, "max_tokens": 5000, "min_tokens": 5000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=1.0)
    _wait_idle(tiny_ensemble)
    assert tiny_ensemble.queue_state() == IDLE


def _wait_idle(ens, seconds=20.0):
    deadline = time.monotonic() + seconds
    while ens.queue_state()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_api_key_timeout_and_queue_limits(bpe_tokenizer, sp_tokenizer):
    # long-context twins of the tiny members: a request here can run for minutes
    llama = tiny_llama(len(bpe_tokenizer), max_positions=10**6)
    gemma = tiny_gemma3(len(sp_tokenizer), max_positions=10**6)
    members = [
        MemberSpec(source=(llama, bpe_tokenizer), name="l"),
        MemberSpec(source=(gemma, sp_tokenizer), name="g"),
    ]
    ens = Ensemble(
        members, min_anchors=50, scheduler=SchedulerConfig(max_batch_size=1, max_queue=1)
    )
    with running_server(create_app(ens, api_key="sesame")) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="m", prompt=PROMPT, max_tokens=2)
        headers = {"Authorization": "Bearer sesame"}
        assert httpx.get(url + "/health").status_code == 200  # no key needed for health
        late = httpx.post(url + "/v1/completions", headers=headers,
                          json={"prompt": PROMPT, "max_tokens": 9000, "min_tokens": 9000,
                                "timeout": 0.05})  # fmt: skip
        assert late.status_code == 408 and late.json()["error"]["code"] == "timeout"
        long = {"prompt": PROMPT, "max_tokens": 10**5, "min_tokens": 10**5, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, headers=headers) as r1:
            lines = r1.iter_lines()  # kept: dropping the iterator closes the connection
            next(lines)  # the one row runs
            waiting = threading.Thread(
                target=httpx.post,
                args=(url + "/v1/completions",),
                kwargs={"json": {"prompt": PROMPT, "max_tokens": 2}, "headers": headers,
                        "timeout": 60},
            )  # fmt: skip
            waiting.start()
            deadline = time.monotonic() + 10
            while ens.queue_state()["waiting_requests"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            full = httpx.post(url + "/v1/completions", headers=headers,
                              json={"prompt": PROMPT, "max_tokens": 2})  # fmt: skip
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        waiting.join(timeout=60)
    ens.close()


def test_503_while_loading_then_ready(tiny_ensemble):
    release = threading.Event()

    def load():
        release.wait(30)
        return tiny_ensemble

    with running_server(create_app(load=load)) as url:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = httpx.post(url + "/v1/completions", json={"prompt": PROMPT})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        reply = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert reply.status_code == 200
        assert (
            json.loads(reply.text)["choices"][0]["text"]
            == tiny_ensemble.generate(PROMPT, max_new_tokens=3).text
        )
