"""Reliability, determinism: a seeded sampling request gives the same text across runs,
batch positions, batch sizes, streaming or not, sync or async, and through the
integrations; greedy requests too, whatever else shares their batch."""

from __future__ import annotations

import asyncio

import pytest

PROMPTS = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
N = 8
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 1234}


@pytest.fixture(scope="module")
def alone(tiny_ensemble):
    return [tiny_ensemble.generate(p, max_new_tokens=N, **SAMPLED) for p in PROMPTS]


def _ids(results):
    return [r.token_ids for r in results]


def test_seeded_sampling_is_the_same_across_runs(tiny_ensemble, alone):
    again = [tiny_ensemble.generate(p, max_new_tokens=N, **SAMPLED) for p in PROMPTS]
    assert _ids(again) == _ids(alone)
    assert [r.text for r in again] == [r.text for r in alone]


def test_the_seed_matters(tiny_ensemble, alone):
    other = tiny_ensemble.generate(PROMPTS, max_new_tokens=N, **{**SAMPLED, "seed": 99})
    greedy = tiny_ensemble.generate(PROMPTS, max_new_tokens=N)
    assert _ids(other) != _ids(alone)
    assert _ids(greedy) != _ids(alone)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_seeded_sampling_is_the_same_in_any_batch_position(tiny_ensemble, alone, batch_size):
    order = [2, 0, 1]  # every prompt at another position than in PROMPTS
    batched = tiny_ensemble.generate(
        [PROMPTS[i] for i in order], max_new_tokens=N, batch_size=batch_size, **SAMPLED
    )
    assert _ids(batched) == [alone[i].token_ids for i in order]


def test_the_same_prompt_twice_in_a_batch_gives_the_same_text(tiny_ensemble, alone):
    """A row's random stream depends on the seed only, not on its neighbours."""
    batched = tiny_ensemble.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[0]], max_new_tokens=N, **SAMPLED
    )
    assert _ids(batched) == [alone[0].token_ids, alone[1].token_ids, alone[0].token_ids]


def test_streamed_and_async_sampling_equal_generate(tiny_ensemble, alone):
    events = list(tiny_ensemble.stream(PROMPTS, max_new_tokens=N, **SAMPLED))
    texts = ["".join(e.delta for e in events if e.index == i) for i in range(len(PROMPTS))]
    assert texts == [r.text for r in alone]
    results = asyncio.run(tiny_ensemble.agenerate(PROMPTS, max_new_tokens=N, **SAMPLED))
    assert _ids(results) == _ids(alone)


def test_seeded_sampling_through_the_integrations(tiny_ensemble, alone):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from deepen_integrations.langchain import DeepEnLLM as LangChainLLM
    from deepen_integrations.llama_index import DeepEnLLM as LlamaIndexLLM

    langchain = LangChainLLM(ensemble=tiny_ensemble, max_tokens=N, **SAMPLED)
    llama_index = LlamaIndexLLM(ensemble=tiny_ensemble, max_new_tokens=N, **SAMPLED)
    expected = [r.text for r in alone]
    assert langchain.batch(PROMPTS) == expected
    assert asyncio.run(langchain.ainvoke(PROMPTS[1])) == expected[1]
    assert llama_index.complete(PROMPTS[2]).text == expected[2]


@pytest.mark.parametrize("main", [0, 1], ids=["main-llama", "main-gemma3"])
def test_greedy_is_the_same_alone_batched_and_streamed(tiny_ensemble, main):
    ens = tiny_ensemble.with_fusion(main=main)
    one = [ens.generate(p, max_new_tokens=N) for p in PROMPTS]
    batched = ens.generate(PROMPTS[::-1], max_new_tokens=N, batch_size=2)
    assert _ids(batched[::-1]) == _ids(one)
    streamed = list(ens.stream(PROMPTS, max_new_tokens=N))
    texts = ["".join(e.delta for e in streamed if e.index == i) for i in range(len(PROMPTS))]
    assert texts == [r.text for r in one]
