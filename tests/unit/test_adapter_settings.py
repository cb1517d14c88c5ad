"""The settings every adapter takes (`deepen_integrations._settings`): the same fields and
defaults in LangChain's `DeepEnLLM`/`ChatDeepEn` and LlamaIndex's `DeepEnLLM`, the same
checks (the engine's), and the same main-member rule for the chat adapters."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.messages import HumanMessage  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402

from deepen_engine import (  # noqa: E402
    ConfigError,
    Ensemble,
    FusionConfig,
    GenerationConfig,
    MemberSpec,
)
from deepen_integrations._settings import DeepEnSettings  # noqa: E402
from deepen_integrations.langchain import ChatDeepEn, DeepEnLLM  # noqa: E402
from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM  # noqa: E402
from tests.conftest import PLAIN  # noqa: E402

ADAPTERS = [DeepEnLLM, ChatDeepEn, LlamaIndexLLM]
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
N = 10


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("settings must be checked without loading models")

    monkeypatch.setattr(Ensemble, "__init__", refuse)


@pytest.fixture(scope="module")
def template_second(tiny_pair) -> Ensemble:
    """tiny-gemma (no chat template) first, tiny-llama (ChatML) second: the chat rule
    picks member 1 while the ensemble's own main is 0."""
    return Ensemble(
        [
            MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
            MemberSpec(source=tiny_pair[0], name="tiny-llama"),
        ],
        min_anchors=50,
        **PLAIN,  # main 0: the chat rule applies (main="auto" picks a chat member itself)
    )


# ---------------------------------------------------------------- fields and defaults


@pytest.mark.parametrize("cls", ADAPTERS)
def test_every_adapter_has_the_shared_fields_with_their_docs(cls):
    for name, field in DeepEnSettings.model_fields.items():
        assert cls.model_fields[name].default == field.default, name
        assert field.description, f"{name} has no docstring"


def test_same_defaults_in_both_adapters(no_loading):
    made = [cls() for cls in ADAPTERS]
    engine = GenerationConfig()
    for name in DeepEnSettings.model_fields:
        values = {repr(getattr(m, name)) for m in made}
        assert len(values) == 1, f"{name} differs: {values}"
    for m in made:
        assert m.max_new_tokens == engine.max_new_tokens == 128
        assert m.min_new_tokens == engine.min_new_tokens
        assert (m.temperature, m.top_p, m.top_k, m.seed, m.truncation) == (
            engine.temperature,
            engine.top_p,
            engine.top_k,
            engine.seed,
            engine.truncation,
        )
        assert m.member_names == ["gemma-3-270m", "smollm2-135m-instruct"]
        assert not m.is_loaded


@pytest.mark.parametrize("cls", ADAPTERS)
def test_max_tokens_is_an_alias_everywhere(cls, no_loading):
    assert cls(max_tokens=7).max_new_tokens == cls(max_new_tokens=7).max_new_tokens == 7


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"models": []}, "models"),
        ({"main": 2}, "main"),
        ({"main": -1}, "main"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, float("nan")]}, "weights"),
        ({"tau": 0}, "tau"),
        ({"fusion_top_k": 0}, "fusion_top_k"),
        ({"candidates": 0}, "candidates"),
        ({"eta": -1}, "eta"),
        ({"steps": -1}, "steps"),
        ({"min_anchors": 0}, "min_anchors"),
        ({"fusion_kwargs": {"weight_decay": -1}}, "weight_decay"),
        ({"fusion_kwargs": {"eta": 0}}, "eta"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 200}, "min_new_tokens"),  # more than max_new_tokens (128)
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"truncation": "right"}, "truncation"),
        ({"stop": [""]}, "stop"),
        ({"seed": "abc"}, "seed"),
        ({"ensemble": "not an ensemble"}, "ensemble"),
    ],
)
@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_bad_value_raises_naming_the_field(cls, settings, field, no_loading):
    with pytest.raises(ConfigError, match=field) as info:
        cls(**settings)
    assert cls.__name__ in str(info.value)


def test_the_engine_decides_what_is_valid(no_loading):
    # values at the engine's limits pass in both adapters: no stricter copy of the checks
    edge = {"eta": 0.0, "steps": 0, "top_p": 1.0, "top_k": 0, "min_new_tokens": 128}
    FusionConfig(eta=0.0, steps=0)
    GenerationConfig(top_p=1.0, top_k=0, min_new_tokens=128)
    for cls in ADAPTERS:
        cls(**edge)
    assert LlamaIndexLLM(min_new_tokens=200, max_new_tokens=300).min_new_tokens == 200


@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_shared_ensemble_is_checked_at_construction(cls, tiny_ensemble):
    with pytest.raises(ConfigError, match="min_anchors"):
        cls(ensemble=tiny_ensemble, min_anchors=10**9)
    with pytest.raises(ConfigError, match="models or ensemble"):
        cls(ensemble=tiny_ensemble, models=["gemma-3-270m"])


def test_min_new_tokens_reaches_the_engine(tiny_ensemble):
    expected = tiny_ensemble.generate(PROMPT, max_new_tokens=N, min_new_tokens=N).text
    assert DeepEnLLM(ensemble=tiny_ensemble, max_tokens=N, min_new_tokens=N).invoke(PROMPT) == (
        expected
    )
    llama_index = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=N)
    assert llama_index.complete(PROMPT, min_new_tokens=N).text == expected


# ---------------------------------------------------------------- the main-member rule


def test_chat_adapters_use_the_engines_chat_rule(template_second):
    ens = template_second
    assert (ens.fusion.main, ens.default_chat_main()) == (0, 1)
    chat_main = ens.with_fusion(main=1)
    conversation = [{"role": "user", "content": QUESTION}]
    expected_chat = chat_main.generate(conversation, max_new_tokens=N).text
    langchain = ChatDeepEn(ensemble=ens, max_tokens=N).invoke([HumanMessage(QUESTION)])
    assert langchain.content == expected_chat
    llama_index = LlamaIndexLLM(ensemble=ens, max_new_tokens=N)
    question = [ChatMessage(role=MessageRole.USER, content=QUESTION)]
    assert llama_index.chat(question).message.content == expected_chat
    # LlamaIndex's DeepEnLLM is a chat model: completion uses the same main member
    completion = llama_index.complete(PROMPT)
    assert completion.text == chat_main.generate(PROMPT, max_new_tokens=N).text
    assert completion.raw["main_member"] == "tiny-llama"
    assert llama_index.metadata.model_name.endswith("main=tiny-llama]")
    # LangChain's text-completion DeepEnLLM keeps the ensemble's main
    text = DeepEnLLM(ensemble=ens, max_tokens=N).invoke(PROMPT)
    assert text == ens.generate(PROMPT, max_new_tokens=N).text


@pytest.mark.parametrize("cls", [ChatDeepEn, LlamaIndexLLM])
def test_the_rule_is_asked_of_the_engine(cls, template_second, monkeypatch):
    asked = []

    def rule() -> int:
        asked.append(True)
        return 0

    monkeypatch.setattr(template_second, "default_chat_main", rule)
    adapter = cls(ensemble=template_second, max_tokens=N)
    assert asked and adapter.ensemble.fusion.main == 0
    assert cls(ensemble=template_second, main=1).ensemble.fusion.main == 1  # explicit wins


def test_default_auto_leads_chat_with_the_chat_member(tiny_pair):
    """With the defaults (main="auto"), a chat request is led by the one member with a chat
    template whatever the member order; a text request by the member that reads it best."""
    models = [
        MemberSpec(source=tiny_pair[1], name="tiny-gemma"),
        MemberSpec(source=tiny_pair[0], name="tiny-llama"),
    ]
    chat = ChatDeepEn(models=models, min_anchors=50, max_tokens=N)
    assert not chat.is_loaded
    assert chat.ensemble.fusion.main == "auto" and chat.ensemble.fusion.weighting == "prompt"
    message = chat.invoke([HumanMessage(QUESTION)])
    alone = chat.ensemble.with_fusion(main=1)  # tiny-llama leads, prompt weights as default
    expected = alone.generate([{"role": "user", "content": QUESTION}], max_new_tokens=N)
    assert message.content == expected.text
    assert message.response_metadata["usage"]["leader"] == "tiny-llama"
    assert message.usage_metadata["input_tokens"] == expected.usage.prompt_tokens["tiny-llama"]
    llama_index = LlamaIndexLLM(ensemble=chat.ensemble, max_new_tokens=N)
    reply = llama_index.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
    assert reply.message.content == expected.text
    assert reply.raw["main_member"] == "tiny-llama"
    assert llama_index.metadata.model_name.endswith("main=auto]")
    text = DeepEnLLM(ensemble=chat.ensemble, max_tokens=N)
    result = chat.ensemble.generate(PROMPT, max_new_tokens=N)
    assert text.invoke(PROMPT) == result.text
    bpb = result.usage.prompt_bits_per_byte
    assert result.usage.leader == min(bpb, key=lambda name: bpb[name])  # type: ignore[arg-type]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__module__ + "." + a.__name__)
def test_a_call_past_its_timeout_raises_and_the_next_call_is_served(tiny_ensemble, adapter):
    from deepen_engine import RequestTimeoutError

    with pytest.raises(ConfigError, match="timeout"):
        adapter(ensemble=tiny_ensemble, timeout=-1)
    llm = adapter(ensemble=tiny_ensemble, max_tokens=4, timeout=1e-9, main=0)
    call = llm.complete if adapter is LlamaIndexLLM else llm.invoke
    with pytest.raises(RequestTimeoutError, match="timeout"):
        call(PROMPT)
    fine = call(PROMPT, timeout=30)  # a per-call timeout replaces the field's
    if adapter is ChatDeepEn:  # the prompt becomes a one-message conversation
        chat = [{"role": "user", "content": PROMPT}]
        assert fine.content == tiny_ensemble.generate(chat, max_new_tokens=4).text
    else:
        text = fine.text if adapter is LlamaIndexLLM else fine
        assert text == tiny_ensemble.generate(PROMPT, max_new_tokens=4).text


def test_structure_check_passes_whole_replies_and_names_the_setting():
    from deepen_engine import OutputCutError
    from deepen_integrations._engine_calls import check_structure_complete

    check_structure_complete("eos", '{"a": 1', False, 5, "max_tokens")  # not a length stop
    check_structure_complete("length", '{"a": 1}', False, 5, "max_tokens")  # closed at the limit
    check_structure_complete("length", "", True, 5, "max_tokens")  # a whole tool call
    with pytest.raises(OutputCutError) as caught:
        check_structure_complete("length", '{"a": 1', False, 40, "max_new_tokens")
    assert str(caught.value) == (
        "The structured reply reached the token limit (40 tokens) before its JSON closed "
        "(finish_reason 'length'): '{\"a\": 1'. Raise max_new_tokens (e.g. max_new_tokens=80) "
        "so the object can be completed."
    )


def test_the_defaults_the_fusion_fields_name_are_the_engines():
    """Each fusion field's description says `(FusionConfig.name, default X)`: X must be
    FusionConfig's default (the descriptions are what LangChain and LlamaIndex users read)."""
    import re

    named = 0
    for name, field in DeepEnSettings.model_fields.items():
        text = field.description or ""
        found = re.search(r"`FusionConfig\.(\w+)`,\s+default\s+([^;)]+?)[;)]", text)
        if found is None:
            continue
        assert name in (found.group(1), "fusion_" + found.group(1))
        said = found.group(2).strip().strip("`").strip('"')
        default = FusionConfig.model_fields[found.group(1)].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(said) == default, (name, said, default)
        else:
            assert said == str(default), (name, said, default)
        named += 1
    assert named >= 13
