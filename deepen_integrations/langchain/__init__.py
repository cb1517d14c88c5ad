"""LangChain adapters for deepen ensembles (needs the `langchain` extra).

- `DeepEnLLM` (`llms.py`, a `BaseLLM`): text in, text out; `batch` is one engine batch.
- `ChatDeepEn` (`chat_models.py`, a `BaseChatModel`): messages in, an `AIMessage` out,
  with tool calling and structured output on the engine's constraints (`tools.py`; the
  engine describes tools and parses calls: deepen_engine/decoding/tools.py); messages
  reach the engine through `_messages.to_engine_messages`.

Both take the settings every deepen adapter takes (`deepen_integrations._settings`), plus
`batch_size` (and `streaming` for chat), through `_base.DeepEnBase`. Data flow of one call::

    LangChain input -> settings (fields, overridden per call: `invoke(x, max_tokens=8,
    eta=0)`) -> the lazily loaded `Ensemble` (or the shared `ensemble=`) viewed with the
    fusion settings -> `Ensemble.stream`/`astream` -> chunks (callbacks get every delta)
    -> LangChain output, with usage and finish_reason on the last chunk

Models load on first use and stay cached on the instance. To share one loaded ensemble
between wrappers, build it once and pass `ensemble=`::

    from deepen_engine import Ensemble
    ens = Ensemble()
    llm = DeepEnLLM(ensemble=ens, max_tokens=32)
    chat = ChatDeepEn(ensemble=ens)
"""

from ._messages import to_engine_messages
from .chat_models import ChatDeepEn
from .llms import DeepEnLLM

__all__ = ["ChatDeepEn", "DeepEnLLM", "to_engine_messages"]
