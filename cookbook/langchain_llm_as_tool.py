"""DeepEnLLM as the backend of a tool that another chat model's agent calls.

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_llm_as_tool.py`.

The agent's own chat model here is langchain-core's `GenericFakeChatModel`, scripted to
call the tool once and then answer with the tool's result, so the script runs offline
and deterministically; in practice it is any tool-calling chat model (a hosted one, or a
`ChatDeepEn` on larger members). The tool completes text with the deepen ensemble.
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool

from deepen_integrations.langchain import DeepEnLLM

ensemble_llm = DeepEnLLM(max_tokens=16, stop=["\n"])  # loads on the first tool call


@tool
def complete(text: str) -> str:
    """Continue a piece of text with a local ensemble of small language models."""
    return ensemble_llm.invoke(text)


class ScriptedToolCaller(GenericFakeChatModel):
    """A fake chat model that calls `complete` first, then answers with its result."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedToolCaller:
        """Tools are scripted; nothing to bind."""
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if results:  # second turn: answer with the tool's output
            self.messages = iter([AIMessage(f"The ensemble wrote: {results[-1].content}")])
        return super()._generate(messages, *args, **kwargs)


def script() -> Iterator[AIMessage]:
    """The first reply: a call of the `complete` tool."""
    yield AIMessage(
        "",
        tool_calls=[
            {"name": "complete", "args": {"text": "The capital of France is"}, "id": "call_1"}
        ],
    )


def main() -> None:
    """Run the agent; the tool's text comes from the deepen ensemble."""
    agent = create_agent(ScriptedToolCaller(messages=script()), tools=[complete])
    result = agent.invoke({"messages": [{"role": "user", "content": "Complete a sentence."}]})
    for message in result["messages"]:
        print(f"{type(message).__name__}: {message.content!r}")
    tool_output = next(m for m in result["messages"] if isinstance(m, ToolMessage)).content
    assert tool_output == ensemble_llm.invoke("The capital of France is")
    assert "Paris" in tool_output, tool_output
    print("OK")


if __name__ == "__main__":
    main()
