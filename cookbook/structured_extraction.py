"""Structured extraction on the default members: the same pydantic schema through LangChain
(`with_structured_output`) and LlamaIndex (`structured_predict`), both on the engine's
JSON-schema constraint, so the result always validates.

Run: `HF_HUB_OFFLINE=1 python cookbook/structured_extraction.py`.

What the 135M/270M members put in the fields is theirs to get right (the script prints it
and checks only the shape); bounded strings (`max_length`) keep a small model from writing
on forever inside a field.
"""

# ruff: noqa: T201  (a script: it prints its results)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from typing import Literal  # noqa: E402

from llama_index.core.prompts import PromptTemplate  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from deepen_engine import Ensemble  # noqa: E402
from deepen_integrations.langchain import ChatDeepEn  # noqa: E402
from deepen_integrations.llama_index import DeepEnLLM  # noqa: E402

TEXT = (
    "Ada Lovelace was a mathematician born in London in 1815. She wrote the first "
    "program for Charles Babbage's Analytical Engine."
)


class Person(BaseModel):
    """A person mentioned in a text."""

    name: str = Field(description="the person's full name", max_length=40)
    birth_year: int = Field(description="year of birth", ge=1000, le=2100)
    city: str = Field(description="city of birth", max_length=30)
    field: Literal["mathematics", "physics", "music", "painting"]


def main() -> None:
    """Extract a Person with both frameworks on one shared ensemble."""
    ens = Ensemble()  # the default members, loaded once for both adapters
    question = f"Extract the person from this text.\n\n{TEXT}"
    chat = ChatDeepEn(ensemble=ens, max_tokens=64)
    person = chat.with_structured_output(Person).invoke(question)
    print(f"LangChain:  {person!r}")
    assert isinstance(person, Person)
    llm = DeepEnLLM(ensemble=ens, max_new_tokens=64)
    prompt = PromptTemplate("Extract the person from this text.\n\n{text}")
    other = llm.structured_predict(Person, prompt, text=TEXT)
    print(f"LlamaIndex: {other!r}")
    assert isinstance(other, Person)
    print("OK")


if __name__ == "__main__":
    main()
