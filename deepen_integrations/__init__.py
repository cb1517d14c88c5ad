"""Framework adapters for deepen ensembles. Each maps framework settings onto one engine
call and holds no decoding logic of its own.

- `deepen_integrations.langchain`: `DeepEnLLM` (BaseLLM) and `ChatDeepEn` (BaseChatModel);
  needs the `langchain` extra.
- `deepen_integrations.llama_index`: `DeepEnLLM` (CustomLLM); needs the `llama-index` extra.

Import the module you need; nothing is imported here, so one framework's absence never
breaks the other.
"""
