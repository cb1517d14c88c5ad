"""A LlamaIndex `FunctionAgent` on DeepEnLLM with one function tool, on the default members:
it calls the tool (the call always parses) and answers once the tool's result is in the
conversation.

Run: `HF_HUB_OFFLINE=1 python cookbook/llama_index_function_agent.py`.

`DeepEnLLM` is a `FunctionCallingLLM`: the engine constrains the main member's decoding, so
a tool call always parses and its arguments match the tool's schema (docs/constraints.md).
The small default members seldom choose to call a tool by themselves, so the agent asks
for one on its first turn (`initial_tool_choice`, LlamaIndex's own setting); after the
tool's result the model answers in text. The price (made up) exists only in the tool's
result; the script prints whether the answer repeats it (content the small members often
get wrong).
"""

# ruff: noqa: T201  (a script: it prints its results)
from __future__ import annotations

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llama_index.core.agent.workflow import FunctionAgent, ToolCall, ToolCallResult  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from deepen_integrations.llama_index import DeepEnLLM  # noqa: E402

QUESTION = "How much does it cost to ship a parcel to Varnholt?"
DESCRIPTION = "Return the price of shipping one parcel to a destination (a place name)."


def shipping_price(destination: str) -> str:
    """Return the price of shipping one parcel to the destination."""
    return f"Shipping one parcel to {destination} costs 42 silver coins."


async def run() -> tuple[list[str], str]:
    """Run the agent once: the tool calls it made and its answer."""
    agent = FunctionAgent(
        # An explicit description: LlamaIndex's default one starts with the Python signature
        # ("shipping_price(destination: str) -> str"), which small models copy as arguments.
        tools=[FunctionTool.from_defaults(shipping_price, description=DESCRIPTION)],
        llm=DeepEnLLM(max_new_tokens=48),
        initial_tool_choice="shipping_price",
        timeout=900,
    )
    handler = agent.run(user_msg=QUESTION)
    calls = []
    async for event in handler.stream_events():
        if isinstance(event, ToolCall) and not isinstance(event, ToolCallResult):
            calls.append(f"{event.tool_name}({event.tool_kwargs})")
            print(f"tool call: {calls[-1]}")
        elif isinstance(event, ToolCallResult):
            print(f"tool result: {event.tool_output.content}")
    response = await handler
    return calls, str(response)


def main() -> None:
    """Run the example and print the answer."""
    calls, answer = asyncio.run(run())
    print(f"Q: {QUESTION}")
    print(f"A: {answer.strip()}")
    assert calls, "the agent did not call its tool"
    # Whether the answer repeats the price is the members' content to get right; say so
    # plainly instead of printing OK when it does not.
    if "42" in answer:
        print("OK: the agent called its tool and answered from its result (42 silver coins)")
    else:
        print(
            "NOT SHOWN: the agent called its tool, but its answer does not use the result "
            "(the 135M/270M default members often answer without it; a stronger chat "
            "member does)"
        )


if __name__ == "__main__":
    main()
