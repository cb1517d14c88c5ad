"""`DeepEnLLM`: a deepen ensemble as a LangChain text-completion model (str in, str out).

Data flow of one call::

    prompts (str, as is: each member tokenises them with its own special tokens)
      -> settings (`DeepEnBase._call`): the fields, overridden per call
         (`invoke(x, max_tokens=8, eta=0)`), stop strings merged (field first)
      -> the engine: the lazily loaded `Ensemble` (or the shared `ensemble=`) viewed with
         the fusion settings (`Ensemble.with_fusion`, cheap, cached per setting)
      -> `Ensemble.stream` / `astream` over all prompts at once (in batches of
         `batch_size`): text deltas, then one final event per row
      -> `_stream`: a GenerationChunk per delta, the last with finish_reason and usage;
         `_generate`: `_LLMCollector` gathers the rows into an LLMResult (texts, generation
         info per row, summed token usage)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from deepen_engine import StreamEvent

from .._engine_calls import engine_astream, engine_stream, token_counts
from ._base import LANGCHAIN_CONFIG, DeepEnBase, generation_info

__all__ = ["DeepEnLLM"]


class DeepEnLLM(DeepEnBase, BaseLLM):
    """A deepen ensemble as a LangChain text-completion model.

    Prompts go to the engine as plain text (each member tokenises it with its own special
    tokens). `main=None` keeps the ensemble's main member (`"auto"` by default: each prompt
    led by the member that reads it best). `batch`/`generate` run all prompts through one
    engine call (in batches of `batch_size`); each prompt gives exactly the text it gives
    alone. Every setting can be overridden per call, fusion settings included
    (`invoke(x, eta=0)`); a keyword that is no setting raises, naming it.

    Example:
        ```python
        from deepen_integrations.langchain import DeepEnLLM

        llm = DeepEnLLM(max_tokens=16)  # loads the default members on first use
        llm.invoke("The capital of France is")
        llm.invoke("Count: 1, 2,", max_tokens=8, stop=["5"])  # per-call settings
        ```
    """

    model_config = LANGCHAIN_CONFIG

    @property
    def _llm_type(self) -> str:
        """The LangChain type name."""
        return "deepen"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that changes the output."""
        return self._settings_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith tracing parameters (provider, model name, temperature, ...)."""
        return self._ls_params(super()._get_ls_params(stop=stop, **kwargs), stop, kwargs)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Generate for all prompts in one engine call (tokens reach the callbacks when
        there is a single prompt).
        """
        call, batch_size = self._call(stop, kwargs)
        collector = _LLMCollector(len(prompts), call.view.main.name, self.model_name)
        events = engine_stream(call.view, list(prompts), call.config, batch_size)
        with closing(events):
            for event in events:
                chunk = collector.add(event)
                if chunk is not None and run_manager is not None and len(prompts) == 1:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return collector.result()

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`_generate` for asyncio: the engine decodes in a worker thread."""
        call, batch_size = await self._acall(stop, kwargs)
        collector = _LLMCollector(len(prompts), call.view.main.name, self.model_name)
        events = engine_astream(call.view, list(prompts), call.config, batch_size)
        async with aclosing(events):
            async for event in events:
                chunk = collector.add(event)
                if chunk is not None and run_manager is not None and len(prompts) == 1:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        return collector.result()

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        """Yield a chunk per text delta, then an empty one with finish_reason and usage."""
        call, _ = self._call(stop, kwargs)
        events = engine_stream(call.view, prompt, call.config)
        with closing(events):  # closing this stream early frees the engine's caches
            for event in events:
                chunk = self._chunk(event, call.view.main.name)
                if chunk.text and run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        """`_stream` for asyncio: the event loop stays free while the engine decodes."""
        call, _ = await self._acall(stop, kwargs)
        events = engine_astream(call.view, prompt, call.config)
        async with aclosing(events):
            async for event in events:
                chunk = self._chunk(event, call.view.main.name)
                if chunk.text and run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _chunk(self, event: StreamEvent, main_name: str) -> GenerationChunk:
        if event.finish_reason is None:
            return GenerationChunk(text=event.delta)
        info = generation_info(event, main_name, self.model_name)
        return GenerationChunk(text=event.delta, generation_info=info)


class _LLMCollector:
    """Aggregates a batch's events into an LLMResult, one generation per prompt."""

    def __init__(self, n: int, main_name: str, model_name: str) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self.infos: list[dict[str, Any] | None] = [None] * n
        self.main_name, self.model_name = main_name, model_name

    def add(self, event: StreamEvent) -> GenerationChunk | None:
        """Record one event; the text chunk it carries, if any."""
        if event.delta:
            self.parts[event.index].append(event.delta)
        if event.finish_reason is not None:
            self.infos[event.index] = generation_info(event, self.main_name, self.model_name)
        return GenerationChunk(text=event.delta) if event.delta else None

    def result(self) -> LLMResult:
        """The LLMResult: texts, finish reasons, summed token usage and the model name."""
        infos = [info for info in self.infos if info is not None]
        if len(infos) < len(self.infos):
            missing = [i for i, info in enumerate(self.infos) if info is None]
            raise RuntimeError(f"the engine stream ended without final events for rows {missing}")
        usage = token_counts(None, self.main_name)  # zeros, summed over the rows
        for info in infos:
            usage = {key: n + info["token_usage"][key] for key, n in usage.items()}
        return LLMResult(
            generations=[
                [Generation(text="".join(parts), generation_info=info)]
                for parts, info in zip(self.parts, infos)
            ],
            llm_output={
                "token_usage": usage,
                "model_name": self.model_name,
            },
        )
