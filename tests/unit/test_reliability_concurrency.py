"""Reliability, concurrency: 32 concurrent requests through each integration (LangChain
`abatch` / gathered `ainvoke`, LlamaIndex gathered `acomplete`) and 8 threads calling
`invoke` return exactly what the same requests return one by one (greedy); concurrent
requests with different settings never mix their state."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from deepen_integrations.langchain import ChatDeepEn  # noqa: E402
from deepen_integrations.langchain import DeepEnLLM as LangChainLLM  # noqa: E402
from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM  # noqa: E402

N = 4
_STARTS = [
    "The capital of France is",
    "Q: What is 12 + 7?\nA:",
    "def add(a, b):",
    "Once upon a time",
    "Zürich, Genève and Malmö",
    "Berlin is the capital of",
    "The quick brown fox",
    "print(add(2, 3))",
]
PROMPTS = [f"{start} {word}" for word in ("a", "the", "12", "Rome") for start in _STARTS]
assert len(PROMPTS) == 32 and len(set(PROMPTS)) == 32


@pytest.fixture(scope="module")
def one_by_one(tiny_ensemble) -> list[str]:
    """Each request run alone, in order, on the engine."""
    texts = [tiny_ensemble.generate(p, max_new_tokens=N).text for p in PROMPTS]
    assert len(set(texts)) > 8, "the requests must differ for the test to mean anything"
    return texts


@pytest.fixture(scope="module")
def langchain(tiny_ensemble) -> LangChainLLM:
    return LangChainLLM(ensemble=tiny_ensemble, max_tokens=N)


def test_the_integrations_one_by_one_equal_the_engine(tiny_ensemble, one_by_one, langchain):
    llama_index = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=N)
    for i in (0, 13, 31):
        assert langchain.invoke(PROMPTS[i]) == one_by_one[i]
        assert llama_index.complete(PROMPTS[i]).text == one_by_one[i]


def test_langchain_abatch_of_32(langchain, one_by_one):
    assert asyncio.run(langchain.abatch(PROMPTS)) == one_by_one  # one engine batch
    # with a concurrency limit LangChain sends separate concurrent requests instead
    limited = asyncio.run(langchain.abatch(PROMPTS, config={"max_concurrency": 8}))
    assert limited == one_by_one


def test_langchain_32_gathered_ainvoke(langchain, one_by_one):
    async def main():
        return await asyncio.gather(*(langchain.ainvoke(p) for p in PROMPTS))

    assert asyncio.run(main()) == one_by_one


def test_llama_index_32_gathered_acomplete(tiny_ensemble, one_by_one):
    llm = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=N)

    async def main():
        return await asyncio.gather(*(llm.acomplete(p) for p in PROMPTS))

    assert [r.text for r in asyncio.run(main())] == one_by_one


def test_8_threads_hammering_invoke(langchain, one_by_one):
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(langchain.invoke, PROMPTS))
    assert got == one_by_one


def test_concurrent_requests_with_different_settings_do_not_mix(tiny_ensemble):
    """Requests differ in length, main member, stop strings and sampling; each gets what it
    gets alone."""
    llm = LangChainLLM(ensemble=tiny_ensemble, max_tokens=N)
    chat = ChatDeepEn(ensemble=tiny_ensemble, max_tokens=N)
    calls = [
        (llm, PROMPTS[0], {}),
        (llm, PROMPTS[1], {"max_tokens": 3}),
        (llm, PROMPTS[2], {"main": 1}),
        (llm, PROMPTS[3], {"eta": 0}),
        (llm, PROMPTS[4], {"temperature": 0.9, "seed": 3}),
        (llm, PROMPTS[5], {"stop": ["a"]}),
        (chat, PROMPTS[6], {}),
        (chat, PROMPTS[7], {"main": 1, "max_tokens": 4}),
    ]

    def text(out):
        return out if isinstance(out, str) else out.content

    alone = [text(model.invoke(prompt, **kw)) for model, prompt, kw in calls]

    async def main():
        return await asyncio.gather(*(m.ainvoke(p, **kw) for m, p, kw in calls))

    assert [text(out) for out in asyncio.run(main())] == alone
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda c: text(c[0].invoke(c[1], **c[2])), calls))
    assert threaded == alone
