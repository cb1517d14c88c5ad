"""The settings both adapters take, defined once: `DeepEnSettings`, a pydantic mixin of
LangChain's `DeepEnLLM`/`ChatDeepEn` and LlamaIndex's `DeepEnLLM`.

Data flow::

    construction: fields (defaults read from the engine's GenerationConfig)
      -> checked by the engine's own models: each fusion field by FusionConfig, each
         generation field by GenerationConfig (a bad value raises `ConfigError` naming the
         adapter's field); with `ensemble=` the fusion settings are applied to it at once
         (`Ensemble.with_fusion`), so a setting the members cannot take raises here too
    first use: `models` (default: the embedded members) loaded into an `Ensemble` with the
         fusion settings given; cached on the instance, shared by its copies
    one call: keyword overrides (`max_tokens=8`, `eta=0`, `stop=[...]`) split into
      -> fusion: a cheap `with_fusion` view of the loaded (or given) ensemble, cached per
         setting; `main=None` is the ensemble's (the default `"auto"`: each request's
         best reader; an index: `Ensemble.default_chat_main()` on a chat adapter)
      -> generation: a `GenerationConfig` (stop strings: the field's, then the call's;
         a call may add an output constraint: `json_schema`, `regex`, `grammar`)
      -> keywords that are no setting come back in `CallSettings.unknown`; each adapter
         decides (LangChain raises, LlamaIndex ignores what LlamaIndex passes along)

Names come from the engine's `display_name` (no loading) and token counts from
`Usage.token_counts`, so both adapters report the same numbers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from deepen_engine import (
    DEFAULT_MEMBERS,
    ConfigError,
    Ensemble,
    FusionConfig,
    GenerationConfig,
    display_name,
)
from deepen_engine.config import LOAD_FUSION_NAMES, REQUEST_FUSION_NAMES
from deepen_engine.errors import explain_validation

__all__ = ["CALL_GENERATION", "CallSettings", "DeepEnSettings"]

# The adapters' generation defaults are the engine's.
_DEFAULTS = GenerationConfig()

# Adapter field -> FusionConfig field (the engine's public names). All are read at load
# time (or applied to a given ensemble); those in CALL_FUSION may also change per call.
FUSION_FIELDS = {**REQUEST_FUSION_NAMES, **LOAD_FUSION_NAMES}
CALL_FUSION = tuple(REQUEST_FUSION_NAMES)
# Adapter fields that are GenerationConfig fields of the same name (all change per call).
GENERATION_FIELDS = tuple(
    "max_new_tokens min_new_tokens temperature top_p top_k seed truncation stop timeout "
    "speculate drafter".split()
)
# GenerationConfig fields a call may set that are no adapter field: the output constraint
# (structured output binds them, e.g. `chat.bind(json_schema={...})`).
CALL_GENERATION = ("json_schema", "regex", "grammar")
_ALIASES = {"max_tokens": "max_new_tokens"}  # call keywords that name a field differently

_Config = TypeVar("_Config", FusionConfig, GenerationConfig)

_LOAD_LOCK = threading.Lock()  # one load at a time (module level: instances stay copyable)


@dataclass(frozen=True)
class CallSettings:
    """What one call runs with."""

    view: Ensemble
    """The ensemble with the call's fusion settings (a cached `with_fusion` view)."""
    config: GenerationConfig
    """The call's generation settings."""
    unknown: tuple[str, ...]
    """Call keywords that are no setting, for the adapter to refuse or ignore."""


class DeepEnSettings(BaseModel):
    """The settings of a deepen adapter, and the lazily loaded engine behind them.

    Subclasses set `chat_adapter` (whether `main=None` means the engine's chat rule).
    """

    model_config = ConfigDict(
        populate_by_name=True,
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,
    )

    chat_adapter: ClassVar[bool] = False

    models: list[Any] | None = None
    """Members to load, in order: embedded names (`gemma-3-270m`, `smollm2-135m-instruct`),
    `.gguf` files, model folders, hub ids, `(model, tokenizer)` pairs, or `MemberSpec`s
    (or dicts of their fields) for a member's device, `device_map`, `max_memory`,
    `quantization`, ... (docs/big-members.md).
    `None`: the embedded default members. Loaded on first use. Not with `ensemble`."""

    shared_ensemble: Ensemble | None = Field(
        default=None, alias="ensemble", exclude=True, repr=False
    )
    """`ensemble=`: a ready `Ensemble` to use instead of loading `models`; share one between
    wrappers (its scheduler batches their requests together). The fusion settings given here apply
    to a cheap view of it (`Ensemble.with_fusion`); the given ensemble is unchanged."""

    method: Literal["deepen", "union", "unite"] | None = None
    """Fusion rule (`FusionConfig.method`): `"deepen"` (the default), `"union"` (GaC: the
    distributions averaged over the union vocabulary) or `"unite"` (UniTE: the union of
    each member's top-k tokens). `None`: the ensemble's."""

    gate: Literal["off", "agree", "confident"] | None = None
    """Per-step gate that skips fusion (`FusionConfig.gate`, default `"off"`). `None`: the
    ensemble's."""

    weighting: Literal["fixed", "confidence", "prompt"] | None = None
    """How the weights apply at each step (`FusionConfig.weighting`, default `"prompt"`):
    `"prompt"`, per request, from how well each member reads the prompt (bits per byte);
    `"fixed"`, the given weights; `"confidence"`, scaled by each member's top probability.
    `None`: the ensemble's."""

    weight_temperature: float | None = None
    """Temperature of `weighting="prompt"` (`FusionConfig.weight_temperature`, default
    0.03; lower: the member that reads the prompt best dominates). `None`: the ensemble's."""

    prompt_score: Literal["whole", "second-half"] | None = None
    """The prompt's tokens the prompt score reads (`FusionConfig.prompt_score`, default
    `"second-half"`): those from the middle of the prompt's text on, or all of them
    (`"whole"`). `None`: the ensemble's."""

    gate_threshold: float | None = None
    """Top probability of the main member from which `gate="confident"` skips fusion
    (`FusionConfig.gate_threshold`, default 0.9). `None`: the ensemble's."""

    main: int | Literal["auto"] | None = None
    """Index of the member whose vocabulary the answer is written in, or `"auto"`: per
    request, the member that reads the prompt best (chat: among the members with a chat
    template; `FusionConfig.main`). `None`: the ensemble's, `"auto"` by default; when the
    ensemble's main is an index, chat adapters (LangChain's `ChatDeepEn`, LlamaIndex's
    `DeepEnLLM`) lead with `Ensemble.default_chat_main()` (the first member with a chat
    template) and LangChain's `DeepEnLLM` with that index."""

    weights: list[float] | None = None
    """One non-negative weight per member (normalised to sum 1). `None`: the ensemble's
    (uniform by default)."""

    tau: float | None = None
    """Temperature of the relative representation (`FusionConfig.tau`, default 100).
    `None`: the ensemble's."""

    fusion_top_k: int | None = None
    """Tokens taken from each member's distribution for fusion (`FusionConfig.top_k`,
    default 64; not the sampling `top_k`). `None`: the ensemble's."""

    top_mass: float | None = None
    """DeePEn fast path: probability mass of each member's non-anchor tokens taken in
    (`FusionConfig.top_mass`, default 0.999). `None`: the ensemble's."""

    unite_top_k: int | None = None
    """UniTE: tokens each member adds to the candidate union (`FusionConfig.unite_top_k`,
    default 10). `None`: the ensemble's."""

    candidates: int | None = None
    """Main-member tokens searched by the inverse transformation (`FusionConfig.candidates`,
    default 64). `None`: the ensemble's."""

    eta: float | None = None
    """Learning rate of the inverse search (`FusionConfig.eta`, default 0.15); `0` is the
    main member alone. `None`: the ensemble's."""

    steps: int | None = None
    """Optimiser steps of the inverse search (`FusionConfig.steps`, default 5); `0` is the
    main member alone. `None`: the ensemble's."""

    min_anchors: int | None = None
    """Fewest shared anchor tokens accepted (`FusionConfig.min_anchors`, default 1000); lower
    it only for tiny test vocabularies. `None`: the ensemble's. Not per call."""

    fusion_device: str | None = None
    """Torch device of the aggregation, the inverse search and the fused logits
    (`FusionConfig.fusion_device`, e.g. `"cuda:1"`). `None`: the main member's device. Not
    per call."""

    fusion_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other `FusionConfig` fields (e.g. `weight_decay`, `row_cache_size`). Empty: the
    ensemble's. Not per call."""

    max_new_tokens: int = Field(default=_DEFAULTS.max_new_tokens, alias="max_tokens")
    """Most tokens of the main member to generate (alias `max_tokens`). Default 128."""

    min_new_tokens: int = _DEFAULTS.min_new_tokens
    """Tokens generated before an end-of-sequence token may be chosen. Default `0`: no
    minimum."""

    temperature: float = _DEFAULTS.temperature
    """Sampling temperature of the fused distribution. Default `0`: greedy."""

    top_p: float = _DEFAULTS.top_p
    """Nucleus sampling threshold in (0, 1]. Default `1`: no cut."""

    top_k: int = _DEFAULTS.top_k
    """Sample among the `top_k` most likely fused tokens. Default `0`: no cut."""

    seed: int | None = _DEFAULTS.seed
    """Seed of each row's sampling (same seed, same prompt: same text). Default
    `None`: a fresh seed per row."""

    truncation: Literal["error", "left"] = _DEFAULTS.truncation
    """A prompt too long for a member's context window. Default `"error"`: raise
    `ConfigError`; `"left"`: drop each member's oldest prompt tokens so the reply fits."""

    stop: list[str] | None = None
    """Strings that end generation; the text is cut exactly before the first one. A call's
    `stop` adds to these. Default `None`: none."""

    speculate: int | None = _DEFAULTS.speculate
    """Speculative fused decoding: `drafter` proposes up to this many tokens per step, the
    fused distribution verifies them (the same text, greedy and sampled). `0`: off. Default
    `None`: 4 with members in process (standard steps while several rows decode together),
    0 with members in Ray actors."""

    drafter: int | Literal["main", "auto", "lookup"] = _DEFAULTS.drafter
    """Which member drafts for `speculate`: `"main"` (default), a member index, `"auto"`
    (the member with the fewest parameters) or `"lookup"` (ids copied from where the row's
    last ids occurred before, else the main member); output is unchanged either way."""

    timeout: float | None = _DEFAULTS.timeout
    """Seconds a call may take, waiting for other requests included; past it the call
    raises `RequestTimeoutError` (a `TimeoutError`) and its rows leave the batch. Default
    `None`: no limit."""

    _loaded: Ensemble | None = PrivateAttr(default=None)  # the loaded `models`

    def __init__(self, **data: Any) -> None:
        """Validate the settings without loading any model.

        Raises:
            ConfigError (a `ValueError`): a bad setting, naming the field.
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(explain_validation(type(self).__name__, exc)) from None

    @model_validator(mode="after")
    def _check_settings(self) -> DeepEnSettings:
        owner = type(self).__name__
        if self.shared_ensemble is not None and self.models is not None:
            raise ConfigError(f"{owner}: give either models or ensemble, not both.")
        if self.models is not None and not self.models:
            raise ConfigError(f"{owner}.models is empty; give at least one member.")
        fusion = _check_fusion(owner, self._fusion_settings(), self.fusion_kwargs)
        _check_generation(owner, {k: getattr(self, k) for k in GENERATION_FIELDS})
        _check_members(owner, fusion, self._member_count())
        if self.shared_ensemble is not None:
            try:
                self._view({})  # the members must take the settings: fail now, not per call
            except ConfigError as exc:
                raise ConfigError(f"{owner}: {exc}") from None
        return self

    def _fusion_settings(self) -> dict[str, Any]:
        """The fusion fields that are set, by FusionConfig name."""
        values = {e: getattr(self, f) for f, e in FUSION_FIELDS.items()}
        return {k: v for k, v in values.items() if v is not None}

    def _member_count(self) -> int:
        if self.shared_ensemble is not None:
            return len(self.shared_ensemble.members)
        return len(self.models or DEFAULT_MEMBERS)

    # --- names -----------------------------------------------------------------------------

    @property
    def member_names(self) -> list[str]:
        """The members' display names, without loading anything."""
        loaded = self.shared_ensemble if self.shared_ensemble is not None else self._loaded
        if loaded is not None:
            return [m.name for m in loaded.members]
        return [display_name(m) for m in self.models or DEFAULT_MEMBERS]

    @property
    def is_loaded(self) -> bool:
        """Whether the members are loaded (or a ready ensemble was given)."""
        return self.shared_ensemble is not None or self._loaded is not None

    # --- the engine ------------------------------------------------------------------------

    @property
    def ensemble(self) -> Ensemble:
        """The engine with this instance's settings: the given ensemble (or `models`, loaded
        on first use and cached) viewed with the fusion settings. Same for every call
        without per-call fusion settings.
        """
        return self._view({})

    def _load(self) -> Ensemble:
        """The given ensemble, or `models` loaded on first use with the fusion settings."""
        if self.shared_ensemble is not None:
            return self.shared_ensemble
        if self._loaded is None:
            with _LOAD_LOCK:
                if self._loaded is None:
                    fusion = {**self.fusion_kwargs, **self._fusion_settings()}
                    self._loaded = Ensemble(list(self.models or DEFAULT_MEMBERS), **fusion)
        return self._loaded

    def _view(self, overrides: Mapping[str, Any]) -> Ensemble:
        """The loaded ensemble with the call's fusion settings, then the instance's
        (`Ensemble.view` decides the precedence and caches the views).
        """
        call = {FUSION_FIELDS[k]: overrides[k] for k in CALL_FUSION if k in overrides}
        defaults = {**self.fusion_kwargs, **self._fusion_settings()}
        return self._load().view(call, defaults=defaults, chat=self.chat_adapter)

    # --- one call --------------------------------------------------------------------------

    def _call_settings(self, overrides: Mapping[str, Any]) -> CallSettings:
        """The view, generation config and unknown keywords for a call's overrides
        (`stop` adds to the field's stop strings; `max_tokens` is `max_new_tokens`).
        """
        calls = {_ALIASES.get(k, k): v for k, v in overrides.items()}
        generation = {k: getattr(self, k) for k in GENERATION_FIELDS}
        generation.update({k: v for k, v in calls.items() if k in GENERATION_FIELDS})
        generation.update({k: v for k, v in calls.items() if k in CALL_GENERATION})
        generation["stop"] = merge_stop(self.stop, calls.get("stop"))
        known = (*GENERATION_FIELDS, *CALL_GENERATION, *CALL_FUSION)
        unknown = tuple(k for k in overrides if _ALIASES.get(k, k) not in known)
        return CallSettings(self._view(calls), GenerationConfig(**generation), unknown)

    async def _acall_settings(self, overrides: Mapping[str, Any]) -> CallSettings:
        """`_call_settings` for asyncio: a first load runs in a worker thread."""
        if not self.is_loaded:
            await asyncio.to_thread(self._load)
        return self._call_settings(overrides)


def merge_stop(field: Sequence[str] | None, call: Sequence[str] | str | None) -> list[str]:
    """The field's stop strings, then the call's new ones (a single string is one)."""
    calls = [call] if isinstance(call, str) else list(call or [])
    out: list[str] = []
    for s in [*(field or []), *calls]:
        if s not in out:
            out.append(s)
    return out


# --- checks: the engine's config models decide; these only name the adapter's field ---------


def _check_fusion(owner: str, fusion: dict[str, Any], extra: dict[str, Any]) -> FusionConfig:
    """The fusion settings (`fusion_kwargs` first), checked by FusionConfig."""
    own = {e: f for f, e in FUSION_FIELDS.items()}
    for key in extra:
        if key in own:
            raise ConfigError(
                f"{owner}.fusion_kwargs[{key!r}]: set it as {owner}.{own[key]} instead."
            )
    labels = {**{k: f"fusion_kwargs[{k!r}]" for k in extra}, **own}
    return _checked(owner, FusionConfig, {**extra, **fusion}, labels)


def _check_generation(owner: str, generation: dict[str, Any]) -> GenerationConfig:
    """The generation settings, checked by GenerationConfig."""
    values = {**generation, "stop": generation["stop"] or []}
    return _checked(
        owner, GenerationConfig, values, {"max_new_tokens": "max_new_tokens (max_tokens)"}
    )


def _checked(
    owner: str, model: type[_Config], values: dict[str, Any], labels: dict[str, str]
) -> _Config:
    """`model(**values)`; if the engine refuses, the error names the adapter's field for
    the engine's `ConfigError.field` (else the settings together).
    """
    try:
        return model(**values)
    except ConfigError as exc:
        if exc.field is not None and exc.field in values:
            label = labels.get(exc.field, exc.field)
            raise ConfigError(
                f"{owner}.{label}: {exc}", field=label, owner=owner, reason=exc.reason
            ) from None
        raise ConfigError(f"{owner}: {exc}", owner=owner, reason=exc.reason) from None


def _check_members(owner: str, fusion: FusionConfig, n: int) -> None:
    """Settings that depend on the number of members (known before loading)."""
    try:
        fusion.check_members(n)
    except ConfigError as exc:
        raise ConfigError(f"{owner}: {exc}") from None
