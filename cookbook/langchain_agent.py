"""An agent on ChatDeepEn with one tool, via `langchain.agents.create_agent`, on the
default members: it calls the tool (the call always parses) and answers once the tool's
result is in the conversation.

Run: `HF_HUB_OFFLINE=1 python cookbook/langchain_agent.py`.

The engine constrains the main member's decoding, so a tool call always parses and its
arguments match the tool's schema (docs/constraints.md). Deciding *whether* to call is
the model's: the 135M/270M default members usually answer in text when they may choose
(`tool_choice="auto"`), so a middleware asks for a tool call on the agent's first model
turn (`tool_choice="any"`, LangChain's own way) and leaves the later turns free: after the
tool's result the model answers in text. The price (made up) exists only in the tool's
result; the script ends with `OK` only when the answer repeats it, and otherwise says
plainly that it does not (`NOT SHOWN: ...`): the 135M/270M members often do not (one run
here echoed the tool instruction instead), which is content, not mechanics.
"""

# ruff: noqa: T201  (a script: it prints its results)

from __future__ import annotations

from collections.abc import Callable

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from deepen_integrations.langchain import ChatDeepEn

CALLS: list[str] = []


@tool
def shipping_price(destination: str) -> str:
    """Return the price of shipping one parcel to the destination."""
    CALLS.append(destination)
    return f"Shipping one parcel to {destination} costs 42 silver coins."


@wrap_model_call
def first_turn_calls_a_tool(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Ask for a tool call until a tool has answered; then let the model choose."""
    if not any(isinstance(m, ToolMessage) for m in request.messages):
        request = request.override(tool_choice="any")
    return handler(request)


def main() -> None:
    """Run the agent on one question and print its messages."""
    model = ChatDeepEn(max_tokens=48)  # main: SmolLM2-135M-Instruct, the chat-tuned member
    agent = create_agent(model, tools=[shipping_price], middleware=[first_turn_calls_a_tool])
    question = "How much does it cost to ship a parcel to Varnholt?"
    result = agent.invoke({"messages": [{"role": "user", "content": question}]})
    for message in result["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"{type(message).__name__}: {message.content!r}" + (f" {calls}" if calls else ""))
    final = result["messages"][-1]
    assert CALLS, "the agent did not call its tool"
    assert isinstance(final, AIMessage) and not final.tool_calls
    print(f"tool called with: {CALLS}")
    # Whether the final answer repeats the price is the members' content to get right; say
    # so plainly instead of printing OK when it does not.
    if "42" in final.content:
        print("OK: the agent called its tool and answered from its result (42 silver coins)")
    else:
        print(
            "NOT SHOWN: the agent called its tool, but its answer does not use the result "
            "(the 135M/270M default members often answer without it; a stronger chat "
            "member does)"
        )


if __name__ == "__main__":
    main()
