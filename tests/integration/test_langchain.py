"""Integration tier of the LangChain adapter, on the real default members (Gemma-3-270m and
SmolLM2-135M-Instruct): DeepEnLLM checks, LangChain's standard ChatModelIntegrationTests for
ChatDeepEn, and the cookbook scripts run as subprocesses.

Run with `HF_HUB_OFFLINE=1 pytest -m integration tests/integration/test_langchain.py`. The
members are loaded once per module and shared (`ensemble=`).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402

from deepen_engine import EMBEDDED, Ensemble  # noqa: E402
from deepen_integrations.langchain import ChatDeepEn, DeepEnLLM  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not all(entry.installed() for entry in EMBEDDED.values()),
        reason="the embedded default members' packages are not installed",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
_SHARED: dict[str, Ensemble] = {}


def shared_ensemble() -> Ensemble:
    """The session's default members (tests/integration/conftest.py), for the standard
    suite's `chat_model_params`, which is a property and cannot take a fixture."""
    return _SHARED["ens"]


@pytest.fixture(scope="module", autouse=True)
def ens(default_ensemble) -> Ensemble:
    _SHARED["ens"] = default_ensemble
    return default_ensemble


# ---------------------------------------------------------------- DeepEnLLM


def test_llm_completes_capital(ens):
    llm = DeepEnLLM(ensemble=ens, max_tokens=8)
    text = llm.invoke("The capital of France is")
    assert "Paris" in text
    assert text == ens.generate("The capital of France is", max_new_tokens=8).text


def test_llm_batch_stream_and_usage(ens):
    llm = DeepEnLLM(ensemble=ens, max_tokens=6)
    prompts = ["The capital of France is", "The capital of Italy is"]
    texts = llm.batch(prompts)
    assert texts == [llm.invoke(p) for p in prompts]
    assert "".join(llm.stream(prompts[1])) == texts[1]
    result = llm.generate(prompts)
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == sum(
        g[0].generation_info["token_usage"]["completion_tokens"] for g in result.generations
    )
    assert result.llm_output["model_name"] == "deepen:gemma-3-270m+smollm2-135m-instruct"


def test_llm_stop_and_lcel(ens):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate

    llm = DeepEnLLM(ensemble=ens, max_tokens=16)
    chain = PromptTemplate.from_template("The capital of {country} is") | llm | StrOutputParser()
    text = chain.invoke({"country": "France"})
    assert "Paris" in text
    cut = llm.invoke("The capital of France is", stop=["."])
    assert "." not in cut and text.startswith(cut)


def test_llm_loads_default_members_lazily():
    llm = DeepEnLLM(max_tokens=4)
    assert llm._loaded is None
    assert llm.invoke("The capital of France is")
    assert [m.name for m in llm.client.members] == ["gemma-3-270m", "smollm2-135m-instruct"]


def test_chat_default_main_is_smollm2(ens):
    chat = ChatDeepEn(ensemble=ens, max_tokens=12)
    message = chat.invoke("What is the capital of France? Answer in one word.")
    assert "Paris" in message.content
    conversation = [
        {"role": "user", "content": "What is the capital of France? Answer in one word."}
    ]
    expected = ens.with_fusion(main=1).generate(conversation, max_new_tokens=12)
    assert message.content == expected.text
    assert (
        message.usage_metadata["input_tokens"]
        == (expected.usage.prompt_tokens["smollm2-135m-instruct"])
    )


# ---------------------------------------------------------------- standard tests


def _xfail(name: str, reason: str):
    """The standard test `name`, expected to fail for `reason` (not strict: it may pass)."""
    base = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(base):

        @functools.wraps(base)
        async def test(self, *args, **kwargs):
            return await base(self, *args, **kwargs)

    else:

        @functools.wraps(base)
        def test(self, *args, **kwargs):
            return base(self, *args, **kwargs)

    test = pytest.mark.xfail(reason=reason, strict=False)(test)
    return pytest.mark.asyncio(test) if inspect.iscoroutinefunction(base) else test


_REPEATS = (
    "content: the members repeat 'A cat is a cat, ...' inside the joke's setup string "
    "(greedy) until max_tokens, so the constrained object is cut (finish_reason 'length'); "
    "the pydantic parser refuses a cut object (the typeddict and json_schema variants pass: "
    "LangChain's JSON parser accepts it)"
)

# Tool-calling and structured-output tests: the engine constrains the reply, so calls and
# structured results always parse; these tests get room for a whole object.
TOOL_TESTS = {
    "test_tool_calling",
    "test_tool_calling_async",
    "test_tool_calling_with_no_arguments",
    "test_tool_choice",
    "test_bind_runnables_as_tools",
    "test_tool_message_histories_string_content",
    "test_tool_message_histories_list_content",
    "test_tool_message_error_status",
    "test_structured_output",
    "test_structured_output_async",
    "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param",
    "test_structured_few_shot_examples",
    "test_json_mode",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
}
TOOL_MAX_TOKENS = 64


class TestChatDeepEnIntegration(ChatModelIntegrationTests):
    """LangChain's standard integration tests on the default members."""

    # The repo sets no asyncio_mode (strict): mark the class so the inherited async tests
    # run under pytest-asyncio without overriding them; the sync ones ignore the mark.
    pytestmark = [
        pytest.mark.asyncio,
        pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio' but it is not"),
    ]

    @property
    def chat_model_class(self) -> type[ChatDeepEn]:
        return ChatDeepEn

    @property
    def chat_model_params(self) -> dict:
        return {"ensemble": shared_ensemble()}

    @property
    def standard_chat_model_params(self) -> dict:
        # Short replies keep the tier to minutes on CPU; no timeout/max_retries (local).
        return {"temperature": 0, "max_tokens": 8, "stop": []}

    @pytest.fixture
    def model(self, request) -> ChatDeepEn:
        """The standard model; tool and structured-output tests get TOOL_MAX_TOKENS."""
        params = {**self.standard_chat_model_params, **self.chat_model_params}
        if request.node.originalname in TOOL_TESTS:
            params["max_tokens"] = TOOL_MAX_TOKENS
        return ChatDeepEn(**params, **(getattr(request, "param", None) or {}))

    @property
    def supports_json_mode(self) -> bool:
        return True

    # Content, not parsing: every call and structured reply is constrained and parses when
    # it ends; these end at max_tokens because the members' greedy text runs on.
    test_structured_output = _xfail("test_structured_output", _REPEATS)
    test_structured_output_async = _xfail("test_structured_output_async", _REPEATS)
    test_structured_output_pydantic_2_v1 = _xfail("test_structured_output_pydantic_2_v1", _REPEATS)
    # Since issue 24 a cut object raises OutputCutError instead of reaching the parser, so
    # the variants LangChain's lenient JSON parser used to accept fail the same way.
    test_structured_output_optional_param = _xfail(
        "test_structured_output_optional_param", _REPEATS + "; now OutputCutError"
    )
    test_json_mode = _xfail("test_json_mode", _REPEATS + "; now OutputCutError")
    test_bind_runnables_as_tools = _xfail(
        "test_bind_runnables_as_tools",
        "content: the answer_style argument runs on ('Greeting style of speaking. This is a "
        "...') until max_tokens, so the call is cut (finish_reason 'length') and none is "
        "returned",
    )
    test_unicode_tool_call_integration = _xfail(
        "test_unicode_tool_call_integration",
        "content (measured 2026-12-05 with the defaults, weighting='prompt'): the forced call "
        "keeps '你好啊集团' intact but its description runs on ('A Chinese technology company "
        "that specializes in creating a customer with Unicode name. This company is ...') "
        "until max_tokens, so the call is cut (finish_reason 'length') and none is returned",
    )
    test_agent_loop = _xfail(
        "test_agent_loop",
        "content: with tool_choice 'auto' the members answer 'What is the weather in San "
        "Francisco?' in text instead of calling get_weather (the call would be constrained "
        "once it starts; the choice to start it is the model's)",
    )


# ---------------------------------------------------------------- cookbook

COOKBOOK = sorted((ROOT / "cookbook").glob("langchain_*.py"))


@pytest.mark.parametrize("script", COOKBOOK, ids=[p.name for p in COOKBOOK])
def test_cookbook_script_runs(script: Path, one_process):
    run = one_process[script.name]  # run with the others in one process (conftest.py)
    assert run.rc == 0, run.stderr[-3000:]
    last = run.stdout.splitlines()[-1]
    if script.name == "langchain_agent.py":  # the tool was called (asserted in the script);
        # whether the answer uses its result is content: said plainly, never a false OK
        shown = "OK: the agent called its tool and answered from its result"
        assert last.startswith((shown, "NOT SHOWN: the agent called its tool")), run.stdout
        return
    assert "OK" in last, run.stdout[-3000:]
