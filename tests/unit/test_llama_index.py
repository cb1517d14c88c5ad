"""Unit tier of the LlamaIndex adapter, on the two tiny random members (tiny_ensemble)."""

from __future__ import annotations

import asyncio
import copy
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events import BaseEvent  # noqa: E402

from deepen_engine import ConfigError, Ensemble, FusionConfig  # noqa: E402
from deepen_engine import requests as requests_module  # noqa: E402
from deepen_integrations.llama_index import DeepEnLLM, to_engine_messages  # noqa: E402

PROMPT = "The capital of France is"
N = 12  # tokens per call: enough text, fast on the tiny members

MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="You are brief."),
    ChatMessage(role=MessageRole.USER, content="What is the capital of Italy?"),
]


@pytest.fixture
def llm(tiny_ensemble):
    return DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=N)


def test_complete_equals_engine_generate(llm, tiny_ensemble):
    expected = tiny_ensemble.generate(PROMPT, max_new_tokens=N)
    response = llm.complete(PROMPT)
    assert response.text == expected.text
    assert response.raw["finish_reason"] == expected.finish_reason
    assert response.raw["token_ids"] == expected.token_ids
    usage = response.raw["usage"]
    assert usage["completion_tokens"] == expected.usage.completion_tokens
    assert usage["prompt_tokens"] == expected.usage.prompt_tokens["tiny-llama"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_call_overrides_generation_settings(llm, tiny_ensemble):
    expected = tiny_ensemble.generate(PROMPT, max_new_tokens=3)
    assert llm.complete(PROMPT, max_new_tokens=3).text == expected.text
    assert llm.complete(PROMPT, max_new_tokens=3).raw["usage"]["completion_tokens"] <= 3


def test_stream_complete_concatenates_to_complete(llm):
    full = llm.complete(PROMPT)
    responses = list(llm.stream_complete(PROMPT))
    assert "".join(r.delta for r in responses) == full.text
    assert [r.text for r in responses][-1] == full.text
    text = ""
    for r in responses:  # text is cumulative
        text += r.delta
        assert r.text == text
    assert responses[-1].raw["usage"] == full.raw["usage"]
    assert all(r.raw is None for r in responses[:-1])


def test_stream_closed_early_frees_the_engine(llm):
    stream = llm.stream_complete(PROMPT)
    next(stream)
    stream.close()
    assert llm.complete(PROMPT).text  # the lock was released


def test_chat_renders_each_members_template(llm, tiny_ensemble, monkeypatch):
    conversation = to_engine_messages(MESSAGES)
    rendered = tiny_ensemble.render(conversation)
    assert rendered[0].startswith("<|im_start|>system\nYou are brief.<|im_end|>")  # ChatML
    assert rendered[0].endswith("<|im_start|>assistant\n")
    assert rendered[1] == (
        "System: You are brief.\n\nUser: What is the capital of Italy?\n\nAssistant:"
    )  # the tiny Gemma tokenizer has no template: the engine's transcript
    seen: list[list[str]] = []
    real_render = requests_module.render_chat

    def spy(members, messages, tools=None):
        out = real_render(members, messages, tools)
        seen.append(out)
        return out

    monkeypatch.setattr(requests_module, "render_chat", spy)
    response = llm.chat(MESSAGES)
    assert seen == [rendered]
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == tiny_ensemble.generate(conversation, max_new_tokens=N).text


def test_stream_chat_concatenates_to_chat(llm):
    full = llm.chat(MESSAGES)
    responses = list(llm.stream_chat(MESSAGES))
    assert "".join(r.delta for r in responses) == full.message.content
    assert responses[-1].message.content == full.message.content
    assert responses[-1].raw["usage"] == full.raw["usage"]


def test_roles_map_onto_engine_roles():
    messages = [
        ChatMessage(role=MessageRole.DEVELOPER, content="d"),
        ChatMessage(role=MessageRole.USER, content="u"),
        ChatMessage(role=MessageRole.MODEL, content="m"),
        ChatMessage(role=MessageRole.TOOL, content="t", additional_kwargs={"tool_call_id": "c"}),
    ]
    assert to_engine_messages(messages) == [
        {"role": "system", "content": "d"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "m"},
        {"role": "tool", "content": "t", "tool_call_id": "c", "name": None},
    ]


def test_async_variants_match_sync(llm):
    async def run():
        a = await llm.acomplete(PROMPT)
        s = [r async for r in await llm.astream_complete(PROMPT)]
        c = await llm.achat(MESSAGES)
        sc = [r async for r in await llm.astream_chat(MESSAGES)]
        return a, s, c, sc

    a, s, c, sc = asyncio.run(run())
    assert a.text == llm.complete(PROMPT).text
    assert "".join(r.delta for r in s) == a.text == s[-1].text
    assert s[-1].raw["usage"] == a.raw["usage"]
    assert c.message.content == llm.chat(MESSAGES).message.content
    assert "".join(r.delta for r in sc) == c.message.content


def test_astream_complete_does_not_block_the_event_loop(tiny_ensemble):
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=40)
    ticks_at_delta: list[int] = []

    async def run():
        ticks = 0
        done = asyncio.Event()

        async def ticker():  # ticks every ms: sleep(0) would spin and starve the decoder
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        async for _r in await llm.astream_complete(PROMPT):
            ticks_at_delta.append(ticks)
        done.set()
        await task
        return ticks

    total = asyncio.run(run())
    assert len(ticks_at_delta) >= 2
    # the ticker ran while the worker thread decoded: it advanced between responses
    assert ticks_at_delta[-1] > ticks_at_delta[0]
    assert total > len(ticks_at_delta)


def test_achat_does_not_block_the_event_loop(llm):
    async def run():
        ticks = 0

        async def ticker():  # ticks every ms: sleep(0) would spin and starve the decoder
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        await llm.achat(MESSAGES)
        before = ticks
        task.cancel()
        return before

    assert asyncio.run(run()) > 1


def test_concurrent_calls_are_safe(llm):
    expected = llm.complete(PROMPT).text
    expected_chat = llm.chat(MESSAGES).message.content
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            if i % 2:
                results[i] = "".join(r.delta for r in llm.stream_complete(PROMPT))
            else:
                results[i] = llm.chat(MESSAGES).message.content
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {0: expected_chat, 1: expected, 2: expected_chat, 3: expected}

    async def gather():
        return await asyncio.gather(
            llm.acomplete(PROMPT), llm.achat(MESSAGES), llm.acomplete(PROMPT)
        )

    a, b, c = asyncio.run(gather())
    assert (a.text, b.message.content, c.text) == (expected, expected_chat, expected)


def test_token_counting_handler_counts_engine_usage(tiny_ensemble):
    counter = TokenCountingHandler()
    llm = DeepEnLLM(
        ensemble=tiny_ensemble,
        max_new_tokens=N,
        callback_manager=CallbackManager([counter]),
    )
    done = llm.complete(PROMPT)
    streamed = list(llm.stream_chat(MESSAGES))[-1]
    usages = [done.raw["usage"], streamed.raw["usage"]]
    events = counter.llm_token_counts
    assert [e.prompt_token_count for e in events] == [u["prompt_tokens"] for u in usages]
    assert [e.completion_token_count for e in events] == [u["completion_tokens"] for u in usages]
    assert counter.total_llm_token_count == sum(u["total_tokens"] for u in usages)


class _Collect(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event: BaseEvent, **kwargs) -> None:
        self.events.append(event)


def test_instrumentation_events_fire(llm, monkeypatch):
    handler = _Collect(events=[])
    dispatcher = get_dispatcher()  # root: events of every module propagate to it
    monkeypatch.setattr(dispatcher, "event_handlers", [*dispatcher.event_handlers, handler])
    llm.complete(PROMPT)
    list(llm.stream_complete(PROMPT))
    llm.chat(MESSAGES)

    async def run():
        await llm.acomplete(PROMPT)
        [r async for r in await llm.astream_chat(MESSAGES)]

    asyncio.run(run())
    names = [type(e).__name__ for e in handler.events]
    starts = [n for n in names if n.endswith("StartEvent") and n.startswith("LLM")]
    ends = [n for n in names if n.endswith("EndEvent") and n.startswith("LLM")]
    assert starts == [
        "LLMCompletionStartEvent",
        "LLMCompletionStartEvent",
        "LLMChatStartEvent",
        "LLMCompletionStartEvent",
        "LLMChatStartEvent",
    ]
    assert ends == [
        "LLMCompletionEndEvent",
        "LLMCompletionEndEvent",
        "LLMChatEndEvent",
        "LLMCompletionEndEvent",
        "LLMChatEndEvent",
    ]
    assert "LLMCompletionInProgressEvent" in names
    assert "LLMChatInProgressEvent" in names
    end = next(e for e in handler.events if type(e).__name__ == "LLMCompletionEndEvent")
    assert end.response.raw["usage"]["completion_tokens"] > 0


def test_metadata(llm, tiny_ensemble):
    meta = llm.metadata
    assert meta.is_chat_model is True
    assert meta.num_output == N
    assert meta.context_window == 1024 - N  # tiny members: max_position_embeddings 1024
    assert meta.model_name == "deepen[tiny-llama + tiny-gemma; main=tiny-llama]"
    assert DeepEnLLM(ensemble=tiny_ensemble, context_window=100).metadata.context_window == 100


def test_main_and_fusion_settings_apply_to_a_view(tiny_ensemble):
    llm = DeepEnLLM(ensemble=tiny_ensemble, main=1, eta=0.0, max_new_tokens=N)
    assert llm.ensemble is not tiny_ensemble
    assert llm.ensemble.members is tiny_ensemble.members  # shared, nothing reloaded
    assert llm.ensemble.fusion.main == 1 and llm.ensemble.fusion.eta == 0.0
    assert tiny_ensemble.fusion.main == 0  # the shared ensemble is unchanged
    expected = tiny_ensemble.with_fusion(main=1, eta=0.0).generate(PROMPT, max_new_tokens=N)
    assert llm.complete(PROMPT).text == expected.text
    assert llm.metadata.model_name.endswith("main=tiny-gemma]")


class FakeEnsemble:
    """Stands in for `Ensemble` when loading the default members: records the load."""

    loads: list = []

    def __init__(self, members, **fusion):
        self.loads.append((tuple(members), fusion))
        self.fusion = FusionConfig(**fusion)
        self._views, self._views_lock = {}, threading.Lock()
        self.members = [
            SimpleNamespace(name="gemma-3-270m", context_window=32768),
            SimpleNamespace(name="smollm2-135m-instruct", context_window=8192),
        ]

    view = Ensemble.view  # the engine's own precedence rule and view cache

    def default_chat_main(self) -> int:
        return 1  # SmolLM2-135M-Instruct: Gemma's GGUF has no chat template

    def with_fusion(self, **changes):
        view = copy.copy(self)
        view.fusion = FusionConfig(**{**self.fusion.model_dump(), **changes})
        return view

    @property
    def main(self):
        return self.members[self.fusion.leader]


def test_default_main_is_auto_and_construction_is_lazy(monkeypatch):
    monkeypatch.setattr(FakeEnsemble, "loads", [])
    monkeypatch.setattr("deepen_integrations._settings.Ensemble", FakeEnsemble)
    llm = DeepEnLLM(eta=0.1)
    assert not llm.is_loaded and FakeEnsemble.loads == []
    assert llm.metadata.model_name == (
        "deepen[gemma-3-270m + smollm2-135m-instruct; main=auto]"  # each request's own
    )
    assert len(FakeEnsemble.loads) == 1  # metadata's context window needed the members
    assert llm.metadata.context_window == 8192 - 128  # smallest window - max_new_tokens
    assert len(FakeEnsemble.loads) == 1  # cached on the instance
    # the fusion settings given are passed at load time; main="auto" (the engine's
    # default) picks among the members with a chat template per request
    assert FakeEnsemble.loads[0] == (("gemma-3-270m", "smollm2-135m-instruct"), {"eta": 0.1})
    assert (llm.ensemble.fusion.main, llm.ensemble.fusion.eta) == ("auto", 0.1)
    explicit = DeepEnLLM(main=0, context_window=100)
    assert explicit.metadata.model_name.endswith("main=gemma-3-270m]")  # not loaded
    assert explicit.ensemble.fusion.main == 0
    assert FakeEnsemble.loads[-1][1] == {"main": 0}
    auto = DeepEnLLM(context_window=100)
    assert auto.metadata.model_name.endswith("main=auto]")  # the rule needs the members
    assert len(FakeEnsemble.loads) == 2


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"eta": -1}, "eta"),
        ({"tau": 0}, "tau"),
        ({"steps": -2}, "steps"),
        ({"fusion_top_k": 0}, "fusion_top_k"),
        ({"candidates": 0}, "candidates"),
        ({"min_anchors": 0}, "min_anchors"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"weights": [1.0, 1.0, 1.0]}, "weights"),
        ({"main": 2}, "main"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"context_window": 0}, "context_window"),
        ({"models": []}, "models"),
        ({"fusion_kwargs": {"weight_decay": -1}}, "weight_decay"),
        ({"fusion_kwargs": {"nonsense": 1}}, "nonsense"),
        ({"fusion_kwargs": {"main": 1}}, "DeepEnLLM.main"),
        ({"fusion_kwargs": {"top_k": 3}}, "fusion_top_k"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(settings, field, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("construction must not load models")

    monkeypatch.setattr(Ensemble, "__init__", no_loading)
    with pytest.raises(ValueError, match=field):
        DeepEnLLM(**settings)


def test_bad_settings_with_a_shared_ensemble(tiny_ensemble):
    with pytest.raises(ValueError, match="main"):
        DeepEnLLM(ensemble=tiny_ensemble, main=2)
    with pytest.raises(ValueError, match="min_anchors"):
        DeepEnLLM(ensemble=tiny_ensemble, min_anchors=10**9)
    with pytest.raises(ValueError, match="models"):
        DeepEnLLM(ensemble=tiny_ensemble, models=["gemma-3-270m"])
    with pytest.raises(ConfigError, match="ensemble"):
        DeepEnLLM(ensemble="not an ensemble")


def test_bad_call_settings_raise_naming_the_field(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.complete(PROMPT, temperature=-1)


def test_async_stream_closed_early_frees_the_engine(llm):
    expected = llm.complete(PROMPT).text

    async def run():
        stream = await llm.astream_chat(MESSAGES)
        first = await stream.__anext__()
        await stream.aclose()
        return first, await llm.acomplete(PROMPT)

    first, after = asyncio.run(run())
    assert first.delta
    assert after.text == expected


# ---------------------------------------------------------------- per-call settings


def test_per_call_fusion_settings(llm, tiny_ensemble):
    fused = tiny_ensemble.generate(PROMPT, max_new_tokens=N)
    alone = tiny_ensemble.with_fusion(eta=0).generate(PROMPT, max_new_tokens=N)
    assert llm.complete(PROMPT, eta=0).text == alone.text
    main1 = tiny_ensemble.with_fusion(main=1).generate(PROMPT, max_new_tokens=N)
    assert main1.text != fused.text  # the override must show
    response = llm.complete(PROMPT, main=1)
    assert response.text == main1.text
    assert response.raw["main_member"] == "tiny-gemma"
    assert response.raw["usage"]["prompt_tokens"] == main1.usage.prompt_tokens["tiny-gemma"]
    assert llm.complete(PROMPT).text == fused.text  # the instance's settings are unchanged
    assert llm.ensemble is tiny_ensemble


def test_per_call_fusion_method(llm, tiny_ensemble):
    union = tiny_ensemble.with_fusion(method="union").generate(PROMPT, max_new_tokens=N)
    assert llm.complete(PROMPT, method="union").text == union.text
    field = DeepEnLLM(ensemble=tiny_ensemble, method="unite", max_new_tokens=N, main=0)
    unite = tiny_ensemble.with_fusion(method="unite").generate(PROMPT, max_new_tokens=N)
    assert field.complete(PROMPT).text == unite.text


def test_per_call_fusion_settings_in_chat_streams_and_async(llm, tiny_ensemble):
    view = tiny_ensemble.with_fusion(main=1, eta=0)
    expected_chat = view.generate(to_engine_messages(MESSAGES), max_new_tokens=N).text
    expected = view.generate(PROMPT, max_new_tokens=N).text
    settings = {"main": 1, "eta": 0}
    assert llm.chat(MESSAGES, **settings).message.content == expected_chat
    assert "".join(r.delta for r in llm.stream_chat(MESSAGES, **settings)) == expected_chat
    assert "".join(r.delta for r in llm.stream_complete(PROMPT, **settings)) == expected

    async def run():
        a = await llm.acomplete(PROMPT, **settings)
        s = [r async for r in await llm.astream_chat(MESSAGES, **settings)]
        return a.text, s[-1].message.content

    assert asyncio.run(run()) == (expected, expected_chat)


def test_per_call_views_are_cached(tiny_ensemble, monkeypatch):
    monkeypatch.setattr(tiny_ensemble, "_views", {})  # the ensemble keeps the views
    llm = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=2)
    made = []
    original = Ensemble.with_fusion

    def spy(self, **changes):
        made.append(changes)
        return original(self, **changes)

    monkeypatch.setattr(Ensemble, "with_fusion", spy)
    llm.complete(PROMPT, eta=0)
    llm.complete(PROMPT, eta=0)
    llm.chat(MESSAGES, eta=0)
    llm.complete(PROMPT)
    assert made == [{"eta": 0}]


def test_bad_per_call_fusion_settings_raise(llm):
    with pytest.raises(ValueError, match="main"):
        llm.complete(PROMPT, main=7)
    with pytest.raises(ValueError, match="eta"):
        llm.chat(MESSAGES, eta=-1)


def test_other_call_keywords_are_ignored(llm):
    assert llm.complete(PROMPT, tools=[], something_else=1).text == llm.complete(PROMPT).text


def test_call_stop_adds_to_the_fields(tiny_ensemble):
    text = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=N).complete(PROMPT).text
    early, late = text[1:3], text[5:8]
    assert early and late and text.index(early) < text.index(late)
    with_field = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=N, stop=[early])
    assert with_field.complete(PROMPT).text == text[: text.index(early)]
    assert with_field.complete(PROMPT, stop=[late]).text == text[: text.index(early)]
    late_field = DeepEnLLM(ensemble=tiny_ensemble, max_new_tokens=N, stop=[late])
    assert late_field.complete(PROMPT, stop=early).text == text[: text.index(early)]
