"""LlamaIndex adapter for deepen ensembles (needs the `llama-index` extra).

- `DeepEnLLM` (`llms.py`, a `FunctionCallingLLM`): completion, chat, tool calls
  (`chat_with_tools`, `FunctionAgent`, `AgentWorkflow`) and their streaming and async
  versions, on the settings every deepen adapter takes (`deepen_integrations._settings`).
- `_messages.py`: LlamaIndex messages to the engine's conversation, replies (with tool
  calls as ToolCallBlocks) back.
- `_structured.py`: `structured_predict` on the engine's JSON-schema constraint.

Example::

    from deepen_integrations.llama_index import DeepEnLLM

    llm = DeepEnLLM(max_new_tokens=64)  # cheap: the models load on first use
    print(llm.complete("The capital of France is").text)
"""

from ._messages import to_engine_messages
from ._structured import STRUCTURED_INSTRUCTION
from .llms import DeepEnLLM

__all__ = ["STRUCTURED_INSTRUCTION", "DeepEnLLM", "to_engine_messages"]
