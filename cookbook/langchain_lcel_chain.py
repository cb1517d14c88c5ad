"""An LCEL chain on the default ensemble: `prompt | DeepEnLLM | StrOutputParser()`.

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_lcel_chain.py` (loads Gemma-3-270m and
SmolLM2-135M-Instruct on first use, then completes three prompts in one batch).
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from deepen_integrations.langchain import DeepEnLLM


def main() -> None:
    """Build the chain, run it on one input, a batch and a stream."""
    llm = DeepEnLLM(max_tokens=12, stop=["\n"])  # greedy; the models load on first use
    chain = PromptTemplate.from_template("The capital of {country} is") | llm | StrOutputParser()

    answer = chain.invoke({"country": "France"})
    print(f"France -> {answer!r}")
    countries = ["Italy", "Germany", "Spain"]
    for country, text in zip(countries, chain.batch([{"country": c} for c in countries])):
        print(f"{country} -> {text!r}")
    streamed = "".join(chain.stream({"country": "France"}))
    assert streamed == answer, (streamed, answer)
    assert "Paris" in answer, answer
    print("OK")


if __name__ == "__main__":
    main()
