"""Framework adapters for deepen ensembles. Each maps framework settings onto one engine
call and holds no decoding logic of its own.

- `deepen_integrations.langchain` (a package): `DeepEnLLM` (BaseLLM, `llms.py`) and
  `ChatDeepEn` (BaseChatModel, `chat_models.py`, with `tools.py`); needs the `langchain`
  extra.
- `deepen_integrations.llama_index`: `DeepEnLLM` (FunctionCallingLLM); needs the
  `llama-index` extra.
- `deepen_integrations._settings`: the settings both take, defined once (`DeepEnSettings`):
  checked by the engine's `FusionConfig`/`GenerationConfig`, the same defaults, per-call
  overrides of generation and fusion settings (cached `Ensemble.with_fusion` views), and
  the engine's leader rule (`main="auto"`, or `default_chat_main` for an indexed main).

Import the module you need; nothing is imported here, so one framework's absence never
breaks the other.
"""
