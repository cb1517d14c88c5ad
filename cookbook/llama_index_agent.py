"""A LlamaIndex ReAct agent driven by a deepen ensemble, with one function tool.

The agent must call the tool: the answer (a made-up shipping price) is only in the
tool's result. Run::

    HF_HUB_OFFLINE=1 python cookbook/llama_index_agent.py

The small default members do not follow LlamaIndex's ReAct instructions from the system
prompt alone, so the script gives them a worked example (one tool call, its observation
and the answer) as chat history, and weights the chat-tuned SmolLM2-135M-Instruct (the
main member) above the base Gemma-3-270m. The stop string "Observation:" ends each step
where the tool's result must come in.
"""

# ruff: noqa: T201  (a script: it prints its results)
from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llama_index.core.agent.workflow import ReActAgent, ToolCall, ToolCallResult  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from deepen_integrations.llama_index import DeepEnLLM  # noqa: E402

QUESTION = "How much does it cost to ship a parcel to Varnholt?"

# A worked example in the ReAct format, given as earlier turns of the conversation.
EXAMPLE = [
    ChatMessage(role="user", content="How much does it cost to ship a parcel to Oslo?"),
    ChatMessage(
        role="assistant",
        content="Thought: I need to use a tool to answer.\nAction: shipping_price\n"
        'Action Input: {"destination": "Oslo"}',
    ),
    ChatMessage(
        role="user", content="Observation: Shipping one parcel to Oslo costs 7 silver coins."
    ),
    ChatMessage(
        role="assistant",
        content="Thought: I can answer without using any more tools.\n"
        "Answer: It costs 7 silver coins.",
    ),
]


def shipping_price(destination: str) -> str:
    """Return the price of shipping one parcel to the destination."""
    return f"Shipping one parcel to {destination} costs 42 silver coins."


async def run(question: str) -> str:
    """Run the agent once; print each tool call and the answer."""
    llm = DeepEnLLM(max_new_tokens=64, stop=["Observation:"], weights=[0.25, 0.75])
    agent = ReActAgent(
        tools=[FunctionTool.from_defaults(shipping_price)],
        llm=llm,
        timeout=600,
    )
    handler = agent.run(user_msg=question, chat_history=list(EXAMPLE), max_iterations=6)
    async for event in handler.stream_events():
        if isinstance(event, ToolCall):
            print(f"tool call: {event.tool_name}({event.tool_kwargs})")
        elif isinstance(event, ToolCallResult):
            print(f"tool result: {event.tool_output.content}")
    response = await handler
    return str(response)


def main() -> None:
    """Run the example and print the answer."""
    start = time.perf_counter()
    answer = asyncio.run(run(QUESTION))
    print(f"Q: {QUESTION}")
    print(f"A: {answer.strip()}")
    print(f"   ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
