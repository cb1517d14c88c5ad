"""Unit tier of the LangChain adapter: the tiny random ensemble from conftest (passed as
`ensemble=`): tool calls and structured output on the engine's constraints parse and
validate even on random weights; a scripted engine for an agent loop whose content tiny
random models cannot produce.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Literal

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import (  # noqa: E402
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402
from pydantic import (
    BaseModel,  # noqa: E402
    Field,  # noqa: E402
)

from deepen_engine import Ensemble, MemberSpec, StreamEvent, ToolCall, Usage  # noqa: E402
from deepen_integrations.langchain import ChatDeepEn, DeepEnLLM, to_engine_messages  # noqa: E402
from deepen_integrations.langchain.chat_models import _ChunkBuilder  # noqa: E402
from deepen_integrations.langchain.tools import engine_tool_choice  # noqa: E402
from tests.conftest import PLAIN  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PROMPT = "The capital of France is"
PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
N = 12


class Tokens(BaseCallbackHandler):
    """Collects every token the callbacks receive."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def llm(tiny_ensemble) -> DeepEnLLM:
    return DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N)


@pytest.fixture(scope="module")
def chat(tiny_ensemble) -> ChatDeepEn:
    return ChatDeepEn(ensemble=tiny_ensemble, max_tokens=N)


# ---------------------------------------------------------------- DeepEnLLM


def test_invoke_equals_engine_generate(llm, tiny_ensemble):
    expected = tiny_ensemble.generate(PROMPT, max_new_tokens=N)
    assert expected.text  # the tiny model does write something
    assert llm.invoke(PROMPT) == expected.text


def test_batch_equals_per_prompt_invoke(llm):
    assert llm.batch(PROMPTS) == [llm.invoke(p) for p in PROMPTS]


def test_batch_size_does_not_change_text(tiny_ensemble, llm):
    small = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N, batch_size=1)
    assert small.batch(PROMPTS) == llm.batch(PROMPTS)


def test_batch_is_one_engine_call(tiny_ensemble, monkeypatch):
    calls = []
    original = Ensemble.stream

    def spy(self, prompt, *args, **kwargs):
        calls.append(prompt)
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "stream", spy)
    DeepEnLLM(ensemble=tiny_ensemble, max_tokens=4).batch(PROMPTS)
    assert calls == [PROMPTS]


def test_stream_concatenation_equals_invoke(llm):
    chunks = list(llm.stream(PROMPT))
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == llm.invoke(PROMPT)


def test_callbacks_receive_every_token(llm):
    handler = Tokens()
    streamed = [c for c in llm.stream(PROMPT, config={"callbacks": [handler]}) if c]
    assert handler.tokens == streamed
    handler2 = Tokens()
    text = llm.invoke(PROMPT, config={"callbacks": [handler2]})
    assert "".join(handler2.tokens) == text
    assert handler2.tokens == streamed


def test_generate_metadata_and_usage(llm, tiny_ensemble):
    result = llm.generate(PROMPTS[:2])
    expected = tiny_ensemble.generate(PROMPTS[:2], max_new_tokens=N)
    main = tiny_ensemble.main.name
    prompt_tokens = sum(r.usage.prompt_tokens[main] for r in expected)
    completion = sum(r.usage.completion_tokens for r in expected)
    assert result.llm_output["token_usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    assert result.llm_output["model_name"] == "deepen:tiny-llama+tiny-gemma"
    for gens, exp in zip(result.generations, expected):
        assert gens[0].text == exp.text
        info = gens[0].generation_info
        assert info["finish_reason"] == exp.finish_reason
        assert info["token_usage"]["prompt_tokens"] == exp.usage.prompt_tokens[main]
        assert info["usage"]["completion_tokens"] == exp.usage.completion_tokens


def test_stream_final_chunk_has_finish_reason(llm):
    chunks = list(llm._stream(PROMPT))
    assert [c.generation_info for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].generation_info["finish_reason"] in {"eos", "length", "stop"}


def test_stop_strings_cut_exactly(llm):
    text = llm.invoke(PROMPT)
    cut = text[3:6]
    assert cut and cut not in text[:3]
    expected = text[: text.index(cut)]
    assert llm.invoke(PROMPT, stop=[cut]) == expected
    result = llm.generate([PROMPT], stop=[cut])
    assert result.generations[0][0].generation_info["finish_reason"] == "stop"
    # the field's stop strings merge with the call's
    with_field = llm.model_copy(update={"stop": [cut]})
    assert with_field.invoke(PROMPT) == expected
    other = text[1:3]
    assert with_field.invoke(PROMPT, stop=[other]) == text[: text.index(other)]


def test_per_call_overrides(llm, tiny_ensemble):
    assert llm.invoke(PROMPT, max_tokens=3) == tiny_ensemble.generate(PROMPT, max_new_tokens=3).text
    assert (
        llm.invoke(PROMPT, max_new_tokens=4)
        == tiny_ensemble.generate(PROMPT, max_new_tokens=4).text
    )
    sampled = tiny_ensemble.generate(PROMPT, max_new_tokens=N, temperature=0.7, seed=3).text
    assert llm.invoke(PROMPT, temperature=0.7, seed=3) == sampled
    bound = llm.bind(temperature=0.7, seed=3)
    assert bound.invoke(PROMPT) == sampled


def test_fusion_settings_reach_the_engine(tiny_ensemble):
    alone = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N, eta=0)
    expected = tiny_ensemble.with_fusion(eta=0).generate(PROMPT, max_new_tokens=N).text
    assert alone.invoke(PROMPT) == expected
    main1 = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N, main=1, weights=[0.3, 0.7])
    expected = tiny_ensemble.with_fusion(main=1, weights=[0.3, 0.7]).generate(
        PROMPT, max_new_tokens=N
    )
    assert main1.invoke(PROMPT) == expected.text
    assert (
        main1.generate([PROMPT]).llm_output["token_usage"]["prompt_tokens"]
        == (expected.usage.prompt_tokens["tiny-gemma"])
    )
    # per call as well
    assert DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N).invoke(PROMPT, eta=0) == (
        alone.invoke(PROMPT)
    )


def test_fusion_method_and_gate_reach_the_engine(tiny_ensemble):
    for method in ("union", "unite"):
        expected = tiny_ensemble.with_fusion(method=method, gate="agree")
        text = expected.generate(PROMPT, max_new_tokens=N).text
        llm = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N, method=method, gate="agree")
        assert llm.invoke(PROMPT) == text
        assert (
            DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N).invoke(
                PROMPT, method=method, gate="agree"
            )
            == text
        )  # per call as well
    with pytest.raises(ValueError, match="method"):
        DeepEnLLM(ensemble=tiny_ensemble, method="vote")


def test_unknown_call_setting_raises(llm):
    with pytest.raises(ValueError, match="tempreature"):
        llm.invoke(PROMPT, tempreature=0.5)


def test_bad_call_value_raises(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.invoke(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="main"):
        llm.invoke(PROMPT, main=7)


def test_ainvoke_and_abatch_equal_sync(llm):
    async def run():
        return await llm.ainvoke(PROMPT), await llm.abatch(PROMPTS)

    one, many = asyncio.run(run())
    assert one == llm.invoke(PROMPT)
    assert many == llm.batch(PROMPTS)


def test_astream_does_not_block_the_event_loop(tiny_ensemble):
    slow = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=20)  # ~20 ms a token: 100s of ticks

    async def run():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        handler = Tokens()
        parts = [c async for c in slow.astream(PROMPT, config={"callbacks": [handler]})]
        done.set()
        await task
        return ticks, parts, handler.tokens

    ticks, parts, tokens = asyncio.run(run())
    assert ticks > 5
    assert "".join(parts) == slow.invoke(PROMPT)
    assert tokens == [p for p in parts if p]


def test_ls_params(llm):
    params = llm._get_ls_params(stop=["x"])
    assert params == {
        "ls_provider": "deepen",
        "ls_model_name": "deepen:tiny-llama+tiny-gemma",
        "ls_model_type": "llm",
        "ls_temperature": 0.0,
        "ls_max_tokens": N,
        "ls_stop": ["x"],
    }
    assert llm._get_ls_params(max_tokens=5, temperature=0.5)["ls_max_tokens"] == 5


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 5},
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"top_k": 4},
        {"seed": 1},
        {"stop": ["x"]},
        {"main": 1},
        {"weights": [1.0, 2.0]},
        {"eta": 0.0},
        {"steps": 2},
        {"fusion_top_k": 8},
        {"candidates": 8},
        {"tau": 50.0},
    ],
)
def test_identifying_params_change_with_settings(tiny_ensemble, change):
    base = DeepEnLLM(ensemble=tiny_ensemble)
    assert DeepEnLLM(ensemble=tiny_ensemble, **change)._identifying_params != (
        base._identifying_params
    )


def test_identifying_params_do_not_load_models():
    llm = DeepEnLLM()
    assert llm._identifying_params["models"] == ["gemma-3-270m", "smollm2-135m-instruct"]
    assert llm._loaded is None


def test_cache_key_differs_per_setting(tiny_ensemble):
    # BaseLLM keys its cache on str(sorted(llm.asdict().items())) (with the call's stop)
    a = DeepEnLLM(ensemble=tiny_ensemble).asdict()
    b = DeepEnLLM(ensemble=tiny_ensemble, temperature=0.3).asdict()
    assert a["_type"] == "deepen"
    assert str(sorted(a.items())) != str(sorted(b.items()))


def test_llm_cache_hits_per_settings(tiny_ensemble):
    from langchain_core.caches import InMemoryCache

    cache = InMemoryCache()
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_tokens=4, cache=cache)
    first = llm.invoke(PROMPT)
    assert llm.invoke(PROMPT) == first
    assert len(cache._cache) == 1
    DeepEnLLM(ensemble=tiny_ensemble, max_tokens=5, cache=cache).invoke(PROMPT)
    assert len(cache._cache) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"models": []}, "models"),
        ({"main": 2}, "main"),
        ({"main": -1}, "main"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"eta": -1}, "eta"),
        ({"stop": [""]}, "stop"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
@pytest.mark.parametrize("cls", [DeepEnLLM, ChatDeepEn])
def test_bad_settings_raise_at_construction(cls, kwargs, field, monkeypatch):
    def no_load(*a, **k):  # validation must not load models
        raise AssertionError("models were loaded")

    monkeypatch.setattr(Ensemble, "__init__", no_load)
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_models_and_ensemble_together_raise(tiny_ensemble):
    with pytest.raises(ValueError, match="models or ensemble"):
        DeepEnLLM(models=["a"], ensemble=tiny_ensemble)


def test_models_load_lazily_once(tiny_pair, monkeypatch):
    members = [
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
    ]
    loads = []
    original = Ensemble.__init__

    def counting(self, *args, **kwargs):
        loads.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "__init__", counting)
    llm = DeepEnLLM(models=members, min_anchors=50, max_tokens=3)
    assert loads == []
    assert llm.model_name == "deepen:tiny-llama+tiny-gemma"
    first = llm.invoke(PROMPT)
    assert llm.invoke(PROMPT) == first
    assert loads == [{"min_anchors": 50}]


def test_llm_type_and_serialisable_params(llm):
    assert llm._llm_type == "deepen"
    assert "deepen:tiny-llama+tiny-gemma" in str(llm)


# ---------------------------------------------------------------- ChatDeepEn

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


def lc_messages():
    return [SystemMessage("You are brief."), HumanMessage("What is the capital of France?")]


def test_chat_invoke_equals_engine(chat, tiny_ensemble):
    message = chat.invoke(lc_messages())
    expected = tiny_ensemble.generate(CONVERSATION, max_new_tokens=N)
    assert isinstance(message, AIMessage)
    assert message.content == expected.text
    assert message.response_metadata["finish_reason"] == expected.finish_reason
    assert message.response_metadata["model_name"] == "deepen:tiny-llama+tiny-gemma"
    main = tiny_ensemble.main.name
    assert message.usage_metadata == {
        "input_tokens": expected.usage.prompt_tokens[main],
        "output_tokens": expected.usage.completion_tokens,
        "total_tokens": expected.usage.prompt_tokens[main] + expected.usage.completion_tokens,
    }


def test_chat_stream_equals_invoke_usage_on_last_chunk(chat):
    handler = Tokens()
    chunks = list(chat.stream(lc_messages(), config={"callbacks": [handler]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    with_usage = [i for i, c in enumerate(chunks) if c.usage_metadata]
    assert with_usage == [len(chunks) - 1]
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["finish_reason"] in {"eos", "length", "stop"}
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    message = chat.invoke(lc_messages())
    assert full.content == message.content
    assert full.usage_metadata == message.usage_metadata
    # LangChain's stream() reports every chunk, the empty last one included
    assert handler.tokens == [c.content for c in chunks]
    handler2 = Tokens()
    chat.invoke(lc_messages(), config={"callbacks": [handler2]})
    assert handler2.tokens == [c.content for c in chunks if c.content]


def test_chat_streaming_flag_gives_same_text(tiny_ensemble, chat):
    streaming = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=N, streaming=True)
    assert streaming.invoke(lc_messages()).content == chat.invoke(lc_messages()).content


def test_chat_async(chat):
    async def run():
        message = await chat.ainvoke(lc_messages())
        chunks = [c async for c in chat.astream(lc_messages())]
        return message, chunks

    message, chunks = asyncio.run(run())
    assert message.content == chat.invoke(lc_messages()).content
    assert "".join(c.content for c in chunks) == message.content
    assert [i for i, c in enumerate(chunks) if c.usage_metadata] == [len(chunks) - 1]


def test_chat_stop_and_overrides(chat, tiny_ensemble):
    text = chat.invoke(lc_messages()).content
    cut = text[2:5]
    assert chat.invoke(lc_messages(), stop=[cut]).content == text[: text.index(cut)]
    short = chat.invoke(lc_messages(), max_tokens=2)
    assert short.content == tiny_ensemble.generate(CONVERSATION, max_new_tokens=2).text
    assert short.response_metadata["finish_reason"] in {"length", "eos"}


def test_chat_default_main_is_first_member_with_chat_template(tiny_pair):
    # tiny-gemma (SentencePiece, no chat template) first, tiny-llama (ChatML) second
    reversed_ens = Ensemble(
        [
            MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
            MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        ],
        min_anchors=50,
        **PLAIN,  # main 0: the chat rule applies (main="auto" picks a chat member itself)
    )
    assert reversed_ens.fusion.main == 0
    chat = ChatDeepEn(ensemble=reversed_ens, max_tokens=N)
    message = chat.invoke(lc_messages())
    expected = reversed_ens.with_fusion(main=1).generate(CONVERSATION, max_new_tokens=N)
    assert message.content == expected.text
    assert message.usage_metadata["input_tokens"] == expected.usage.prompt_tokens["tiny-llama"]
    # an explicit main wins; DeepEnLLM keeps the ensemble's main
    explicit = ChatDeepEn(ensemble=reversed_ens, max_tokens=N, main=0).invoke(lc_messages())
    assert explicit.content == reversed_ens.generate(CONVERSATION, max_new_tokens=N).text
    assert DeepEnLLM(ensemble=reversed_ens, max_tokens=N).invoke(PROMPT) == (
        reversed_ens.generate(PROMPT, max_new_tokens=N).text
    )


def test_chat_ls_params(chat):
    params = chat._get_ls_params(stop=["x"], model="other")
    assert params["ls_provider"] == "deepen"
    assert params["ls_model_type"] == "chat"
    assert params["ls_model_name"] == "other"
    assert params["ls_stop"] == ["x"]
    assert chat._llm_type == "deepen-chat"


def test_message_mapping():
    messages = [
        SystemMessage("sys"),
        HumanMessage("hi"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}]),
        ToolMessage("2", tool_call_id="c1"),
        AIMessage("done"),
        ("human", [{"type": "text", "text": "block text"}]),
    ]
    from langchain_core.messages import convert_to_messages

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    assert to_engine_messages(convert_to_messages(messages)) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "block text"},
    ]


# ---------------------------------------------------------------- tools


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=150)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def lookup(city: str = Field(max_length=8), unit: Literal["C", "F"] = "C") -> str:
    """Look up the weather in a city."""
    return f"18 {unit} in {city}"


def test_engine_tool_choice():
    names = ["add", "mul"]
    assert [engine_tool_choice(c, names) for c in (None, "auto", False)] == ["auto"] * 3
    assert [engine_tool_choice(c, names) for c in ("any", "required", True)] == ["required"] * 3
    assert engine_tool_choice(True, ["add"]) == "add"
    assert engine_tool_choice("none", names) == "none"
    assert engine_tool_choice({"type": "function", "function": {"name": "mul"}}, names) == "mul"
    with pytest.raises(ValueError, match="not one of the bound tools"):
        engine_tool_choice("div", names)


def test_bound_tools_reach_the_engine(chat, tiny_ensemble):
    bound = chat.bind_tools([add], tool_choice="any")
    call = chat._prepare(lc_messages(), None, dict(bound.kwargs))
    assert call.tool_choice == "required"
    assert call.tools is not None and call.tools[0]["function"]["name"] == "add"
    rendered = tiny_ensemble.render(call.conversation, call.tools, call.tool_choice)
    assert rendered[0].startswith("<|im_start|>system\nYou are brief.\n\nYou can call these")
    assert '"name": "add"' in rendered[0] and "You must call one of the tools." in rendered[0]
    none = chat._prepare([HumanMessage("hi")], None, {**bound.kwargs, "tool_choice": "none"})
    assert none.tools is None and none.conversation == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([add], tool_choice="nope")


@pytest.mark.parametrize("choice", ["any", "lookup", True])
def test_forced_tool_calls_parse_on_random_weights(tiny_ensemble, choice):
    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=120, temperature=1.0, seed=3)
    tools = [lookup] if choice is True else [add, lookup]
    message = chat.bind_tools(tools, tool_choice=choice).invoke("What is 2 + 3?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.content == "" and not message.invalid_tool_calls
    (call,) = message.tool_calls
    tool_ = {"add": add, "lookup": lookup}[call["name"]]
    jsonschema.validate(call["args"], tool_.tool_call_schema.model_json_schema())
    # streamed: the same call, as tool_call_chunks with an index
    chunks = list(chat.bind_tools(tools, tool_choice=choice).stream("What is 2 + 3?"))
    (chunk,) = [c for c in chunks if c.tool_call_chunks]
    assert chunk.tool_call_chunks[0]["index"] == 0
    assert json.loads(chunk.tool_call_chunks[0]["args"]) == call["args"]
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]


def test_chunk_builder_tool_calls():
    builder = _ChunkBuilder("m", "deepen:x")
    usage = Usage(completion_tokens=5, prompt_tokens={"m": 7})
    call = ToolCall(id="call_1", name="add", arguments={"a": 1})
    event = StreamEvent(finish_reason="tool_calls", usage=usage, token_ids=[1], tool_calls=[call])
    (chunk,) = builder.add(event)
    message = chunk.message
    assert message.content == ""
    assert [(c["name"], c["args"], c["id"]) for c in message.tool_calls] == [
        ("add", {"a": 1}, "call_1")
    ]
    assert message.usage_metadata == {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("kind", ["pydantic", "dict"])
def test_structured_output_always_parses(tiny_ensemble, method, kind):
    schema = Person if kind == "pydantic" else Person.model_json_schema()
    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=120)
    for seed in range(3):
        structured = chat.with_structured_output(schema, method=method)
        result = structured.invoke("Ada is 36.", temperature=1.0, seed=seed)
        if kind == "pydantic":
            assert isinstance(result, Person)
        else:
            jsonschema.validate(result, Person.model_json_schema())
    raw = chat.with_structured_output(schema, method=method, include_raw=True).invoke("Ada")
    assert raw["parsing_error"] is None and raw["parsed"] is not None
    assert isinstance(raw["raw"], AIMessage)


def test_json_mode_gives_an_object(tiny_ensemble):
    from deepen_engine import OutputCutError

    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=60)
    mode = chat.with_structured_output(None, method="json_mode", include_raw=True)
    out = mode.invoke("Ada is 36.")
    assert out["raw"].content.startswith('{"')  # constrained to an object
    # Random weights write keys on and on: the object is cut at max_tokens, which is said
    # (OutputCutError), where LangChain's lenient parser used to return half an object.
    assert out["raw"].response_metadata["finish_reason"] == "length"
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputCutError)
    with pytest.raises(ValueError, match="method must be one of"):
        chat.with_structured_output(Person, method="xml")


def test_structured_output_cut_short_is_a_parsing_error(tiny_ensemble):
    from deepen_engine import OutputCutError

    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=3)
    out = chat.with_structured_output(Person, include_raw=True).invoke("Ada is 36.")
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputCutError)
    assert out["raw"].response_metadata["finish_reason"] == "length"
    for method in ("json_schema", "function_calling", "json_mode"):
        schema = None if method == "json_mode" else Person
        with pytest.raises(OutputCutError, match=r"token limit \(3 tokens\).*Raise max_tokens"):
            chat.with_structured_output(schema, method=method).invoke("Ada is 36.")


class ScriptedEnsemble(Ensemble):
    """The tiny ensemble's members with scripted replies (text, or a tool call): for an
    agent loop whose content tiny random models cannot produce. Records the conversation,
    tools and tool choice of each request."""

    def __init__(self, base: Ensemble, replies: list[str | ToolCall]) -> None:  # no loading
        self.members = base.members
        self.fusion = base.fusion
        self.replies = list(replies)
        self.seen: list[Any] = []

    def with_fusion(self, **changes: Any) -> Ensemble:
        return self

    def stream(
        self, prompt, config=None, *, batch_size=None, tools=None, tool_choice=None, **overrides
    ) -> Iterator[StreamEvent]:
        self.seen.append((prompt, tools, tool_choice))
        reply = self.replies.pop(0)
        usage = Usage(completion_tokens=3, prompt_tokens={"tiny-llama": 3})

        def events():
            if isinstance(reply, ToolCall):
                yield StreamEvent(
                    finish_reason="tool_calls", usage=usage, token_ids=[], tool_calls=[reply]
                )
                return
            for i in range(0, len(reply), 5):
                yield StreamEvent(delta=reply[i : i + 5])
            yield StreamEvent(finish_reason="eos", usage=usage, token_ids=[])

        return events()

    async def astream(self, prompt, config=None, *, batch_size=None, **overrides):
        for event in self.stream(prompt, config, **overrides):
            yield event


def test_agent_scripted(tiny_ensemble):
    from langchain.agents import create_agent

    call = ToolCall(id="call_7", name="add", arguments={"a": 2, "b": 3})
    scripted = ScriptedEnsemble(tiny_ensemble, [call, "The sum is 5."])
    agent = create_agent(ChatDeepEn(ensemble=scripted), tools=[add])
    result = agent.invoke({"messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    messages = result["messages"]
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    assert messages[1].tool_calls[0]["id"] == "call_7"
    assert messages[2].content == "5" and messages[2].tool_call_id == "call_7"
    assert messages[-1].content == "The sum is 5."
    # the engine got the tools, and the second request shows the call and its result
    first, tools, choice = scripted.seen[0]
    assert [t["function"]["name"] for t in tools] == ["add"] and choice == "auto"
    second = scripted.seen[1][0]
    function = {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert second[-2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_7", "type": "function", "function": function}],
    }
    assert second[-1] == {"role": "tool", "content": "5", "tool_call_id": "call_7", "name": "add"}


def test_agent_runs_on_tiny_models(tiny_ensemble):
    from langchain.agents import create_agent

    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=8)
    agent = create_agent(chat, tools=[add])
    result = agent.invoke({"messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    messages = result["messages"]
    assert isinstance(messages[0], HumanMessage) and len(messages) >= 2
    # every model turn is exactly what the model gives for the conversation so far (with
    # the tool bound), and every tool turn answers a call of the turn before
    bound = chat.bind_tools([add])
    for i, message in enumerate(messages[1:], start=1):
        if isinstance(message, ToolMessage):
            calls = messages[i - 1].tool_calls if isinstance(messages[i - 1], AIMessage) else []
            assert message.tool_call_id in [c["id"] for c in calls]
            continue
        assert isinstance(message, AIMessage)
        direct = bound.invoke(messages[:i])
        assert message.content == direct.content
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            (c["name"], c["args"]) for c in direct.tool_calls
        ]
        assert message.usage_metadata == direct.usage_metadata
    # the loop ends on a reply without tool calls, which the tiny models did write
    assert not messages[-1].tool_calls
    assert messages[-1].usage_metadata["output_tokens"] > 0


# ---------------------------------------------------------------- langchain_tests

_TINY: dict[str, Ensemble] = {}


class TestChatDeepEnStandard(ChatModelUnitTests):
    """LangChain's standard unit tests, on the tiny ensemble (no real model is loaded)."""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_ensemble, monkeypatch):
        # chat_model_params is a property (no fixtures): hand it the session's ensemble.
        monkeypatch.setitem(_TINY, "ensemble", tiny_ensemble)

    @property
    def chat_model_class(self) -> type[ChatDeepEn]:
        return ChatDeepEn

    @property
    def chat_model_params(self) -> dict:
        return {"ensemble": _TINY["ensemble"]}

    @property
    def standard_chat_model_params(self) -> dict:
        # No `timeout`, `max_retries` or `api_key`: local models, and unknown settings raise.
        return {"temperature": 0, "max_tokens": 100, "stop": []}


def test_structured_schema_is_closed(chat):
    bound = chat.with_structured_output(Person).first  # the model bound to the constraint
    schema = bound.kwargs["json_schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"name", "age"}
    assert bound.kwargs["ls_structured_output_format"]["schema"] is Person


def test_pydantic_v1_schemas_parse_to_instances():
    import warnings

    from langchain_core.output_parsers import PydanticOutputParser

    from deepen_integrations.langchain.tools import structured_parser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic.v1 import BaseModel as BaseModelV1

        class JokeV1(BaseModelV1):
            setup: str

    parser = structured_parser(JokeV1, "json_schema", None)
    assert isinstance(parser, PydanticOutputParser)
    assert parser.invoke('{"setup": "x"}') == JokeV1(setup="x")
