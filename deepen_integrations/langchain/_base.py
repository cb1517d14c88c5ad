"""What `DeepEnLLM` and `ChatDeepEn` share on top of the adapters' common settings
(`deepen_integrations._settings.DeepEnSettings`): LangChain's view of them.

Data flow of one call's settings::

    LangChain call (stop=..., **kwargs from invoke/bind)
      -> DeepEnBase._call: batch_size taken out, the rest through
         DeepEnSettings._call_settings (fusion view + GenerationConfig); a keyword that is
         no setting raises, naming it (LangChain's `ls_*` hints, `tools`, `tool_choice`
         and `model` are let through)
      -> (view, config, batch_size) for the engine

and of its description: `_settings_params` (every setting that changes the output: the
cache key and `_identifying_params`) and `_ls_params` (LangSmith tracing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from langchain_core.language_models import LangSmithParams
from pydantic import ConfigDict, Field

from deepen_engine import ConfigError, Ensemble, StreamEvent, Usage

from .._engine_calls import token_counts as token_counts
from .._settings import (
    CALL_FUSION,
    CALL_GENERATION,
    FUSION_FIELDS,
    GENERATION_FIELDS,
    CallSettings,
    DeepEnSettings,
    merge_stop,
)

__all__ = [
    "LANGCHAIN_CONFIG",
    "PROVIDER",
    "DeepEnBase",
    "generation_info",
    "token_counts",
    "usage_dict",
]

PROVIDER = "deepen"

# Call keywords LangChain passes along that are no setting: tracing hints start with "ls_";
# tools are handled by ChatDeepEn (passed to the engine); `model` names the model in tracing.
_PASSED_ALONG = frozenset({"tools", "tool_choice", "model"})

# An unknown setting raises. Each class sets it again: pydantic merges the bases' configs
# in order, and LangChain's base classes (listed second) say extra="ignore".
LANGCHAIN_CONFIG = ConfigDict(extra="forbid")


class DeepEnBase(DeepEnSettings):
    """The settings of `DeepEnLLM` and `ChatDeepEn` (see `DeepEnSettings`), plus `batch_size`,
    and LangChain's description of them.
    """

    model_config = LANGCHAIN_CONFIG

    batch_size: int | None = Field(default=None, ge=1)
    """Prompts per engine batch in `batch`/`generate`. Default `None`: all at once. Does not
    change the text."""

    @property
    def model_name(self) -> str:
        """A name for the ensemble, e.g. `deepen:gemma-3-270m+smollm2-135m-instruct`."""
        return f"{PROVIDER}:" + "+".join(self.member_names)

    @property
    def client(self) -> Ensemble:
        """The engine with this instance's settings (LangChain's name for `ensemble`)."""
        return self.ensemble

    def _call(
        self, stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[CallSettings, int | None]:
        """A call's settings and batch size; raises on a keyword that is no setting."""
        overrides = {k: v for k, v in kwargs.items() if k != "batch_size"}
        call = self._call_settings({**overrides, "stop": stop})
        return self._refuse_unknown(call), kwargs.get("batch_size", self.batch_size)

    async def _acall(
        self, stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[CallSettings, int | None]:
        """`_call` for asyncio: a first load runs in a worker thread."""
        overrides = {k: v for k, v in kwargs.items() if k != "batch_size"}
        call = await self._acall_settings({**overrides, "stop": stop})
        return self._refuse_unknown(call), kwargs.get("batch_size", self.batch_size)

    def _refuse_unknown(self, call: CallSettings) -> CallSettings:
        unknown = [k for k in call.unknown if not k.startswith("ls_") and k not in _PASSED_ALONG]
        if unknown:
            known = sorted(
                {*CALL_FUSION, *GENERATION_FIELDS, *CALL_GENERATION, "max_tokens", "batch_size"}
            )
            raise ConfigError(
                f"{type(self).__name__} got an unknown call setting {unknown[0]!r}; use one "
                f"of {known}."
            )
        return call

    def _settings_params(self) -> dict[str, Any]:
        """Every setting that changes the output (LangChain's cache key and tracing)."""
        params: dict[str, Any] = {"model_name": self.model_name, "models": self.member_names}
        if self.shared_ensemble is not None:
            params["ensemble_fusion"] = self.shared_ensemble.fusion.model_dump()
        for key in (*FUSION_FIELDS, *GENERATION_FIELDS):
            params[key] = getattr(self, key)
        if self.fusion_kwargs:
            params["fusion_kwargs"] = dict(self.fusion_kwargs)
        return params

    def _ls_params(
        self, base: LangSmithParams, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> LangSmithParams:
        base["ls_provider"] = PROVIDER
        base["ls_model_name"] = kwargs.get("model") or self.model_name
        base["ls_temperature"] = kwargs.get("temperature", self.temperature)
        base["ls_max_tokens"] = kwargs.get(
            "max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)
        )
        merged = merge_stop(self.stop, stop)
        if merged:
            base["ls_stop"] = merged
        return base


def generation_info(event: StreamEvent, main_name: str, model_name: str) -> dict[str, Any]:
    """A row's final event as LangChain generation info (finish reason, usage, model)."""
    return {
        "finish_reason": event.finish_reason,
        "model_name": model_name,
        "token_usage": token_counts(event.usage, main_name),
        "usage": usage_dict(event.usage),
    }


def usage_dict(usage: Usage | None) -> dict[str, Any]:
    """The engine's whole usage record (every member's counts and timings), or {}."""
    return asdict(usage) if usage is not None else {}
