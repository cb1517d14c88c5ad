"""An agent on ChatDeepEn with one tool, via `langchain.agents.create_agent`.

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_agent.py`.

ChatDeepEn describes the tool to the members in a system instruction and parses a JSON
reply `{"name": ..., "arguments": {...}}` into a tool call. The default members (135M and
270M parameters) rarely follow that instruction: the agent then ends with a plain-text
answer, which this script reports honestly. With larger members (`models=[...]`) the same
code calls the tool.
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from deepen_integrations.langchain import ChatDeepEn


@tool
def get_capital(country: str) -> str:
    """Return the capital city of a country."""
    capitals = {"france": "Paris", "italy": "Rome", "germany": "Berlin", "spain": "Madrid"}
    return capitals.get(country.strip().lower(), "unknown")


def main() -> None:
    """Run the agent on one question and print its messages."""
    model = ChatDeepEn(max_tokens=48)  # main: SmolLM2-135M-Instruct, the chat-tuned member
    agent = create_agent(
        model,
        tools=[get_capital],
        system_prompt="You answer questions about countries. Use the tools when useful.",
    )
    result = agent.invoke(
        {"messages": [{"role": "user", "content": "What is the capital of Italy?"}]}
    )
    for message in result["messages"]:
        calls = getattr(message, "tool_calls", None) or getattr(message, "invalid_tool_calls", None)
        print(f"{type(message).__name__}: {message.content!r}" + (f" {calls}" if calls else ""))
    used = any(isinstance(m, ToolMessage) for m in result["messages"])
    print(f"tool used: {used}")
    assert isinstance(result["messages"][-1], AIMessage)
    print("OK")


if __name__ == "__main__":
    main()
