"""Structured output on the default members cannot run away (issue 24): LangChain's
`with_structured_output` on 5 varied schemas x 5 prompts with `max_tokens=64` parses 25/25.

Before numbers were bounded in the grammar (deepen_engine/grammar.py), "Nairobi, please."
with the City schema wrote `"population_millions": 1000000000000...` until the limit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llguidance")

from pydantic import BaseModel  # noqa: E402

from deepen_integrations.langchain import ChatDeepEn  # noqa: E402

pytestmark = pytest.mark.integration


class City(BaseModel):
    name: str
    country: str
    population_millions: float
    kind: Literal["capital", "port", "other"]


class Person(BaseModel):
    name: str
    age: int
    occupation: str


class Product(BaseModel):
    name: str
    price: float
    in_stock: bool


class Event(BaseModel):
    title: str
    year: int
    place: str


class Measurement(BaseModel):
    quantity: str
    value: float
    unit: str
    count: int


CASES = [
    (City, ["Nairobi, please.", "Tell me about Lyon.", "Osaka", "Describe Valparaíso.",
            "A small town called Brig."]),
    (Person, ["Ada Lovelace, mathematician, died at 36.", "Bob is a 42 year old baker.",
              "Describe a nurse called Mia.", "Marie Curie", "Someone who writes code."]),
    (Product, ["A red umbrella for 12 euros, available now.", "Describe a laptop.",
               "The coffee mug is sold out.", "Bananas", "An expensive watch."]),
    (Event, ["The first Moon landing.", "The fall of the Berlin Wall.", "Woodstock",
             "A concert in Paris in 2015.", "The signing of the Magna Carta."]),
    (Measurement, ["The room is 21.5 degrees Celsius.", "Three apples weigh 450 grams.",
                   "Mount Everest's height.", "The speed of light.", "A marathon's length."]),
]  # fmt: skip


def test_25_structured_outputs_parse_at_64_tokens(default_ensemble):
    # 2026-12-04, fixed weights and leader: 24/25 (Measurement for 'The room is 21.5 degrees
    # Celsius.' repeated '21.5; ...' in a string until max_tokens); the defaults parse all 25
    chat = ChatDeepEn(ensemble=default_ensemble, max_tokens=64)

    def run(case):  # the five schemas' batches at once: the engine runs their 25 rows together
        schema, prompts = case
        return chat.with_structured_output(schema).batch(prompts, return_exceptions=True)

    with ThreadPoolExecutor(len(CASES)) as pool:
        all_results = list(pool.map(run, CASES))
    parsed, failed = 0, []
    for (schema, prompts), results in zip(CASES, all_results):
        for prompt, result in zip(prompts, results):
            if isinstance(result, schema):
                parsed += 1
            else:
                failed.append((schema.__name__, prompt, repr(result)[:300]))
    assert (parsed, len(failed)) == (25, 0), failed
