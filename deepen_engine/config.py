"""Validated settings: how members are fused (`FusionConfig`) and how text is generated
(`GenerationConfig`).

Every field has a documented default; a bad value raises `ConfigError` (a `ValueError`)
that names the field, the value and the valid range.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from .errors import ConfigError, InvalidField
from .grammar import check_constraint
from .settings import Settings, index_or
from .text_checks import check_text as check_text
from .text_checks import text_problem

Method = Literal["deepen", "union", "unite"]
METHODS: tuple[str, ...] = get_args(Method)
"""The fusion methods, in the order commands list them."""


Weighting = Literal["fixed", "confidence", "prompt"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
"""How the member weights apply (`FusionConfig.weighting`), in the order commands list them."""


PromptScore = Literal["whole", "second-half"]
PROMPT_SCORES: tuple[str, ...] = get_args(PromptScore)
"""The prompt spans a prompt score may read (`FusionConfig.prompt_score`)."""
DraftPrecision = Literal["auto", "float32", "bfloat16"]  # `SchedulerConfig.draft_precision`
Drafter = Literal["main", "auto", "lookup"]  # `GenerationConfig.drafter`, or a member index


class FusionConfig(Settings):
    """How the members' next-token distributions are fused.

    `method` chooses the rule: DeePEn (arXiv 2404.12715, the default), GaC's union of the
    vocabularies (arXiv 2406.12585) or UniTE's union of the top-k tokens (arXiv
    2410.03777); docs/design.md gives each formula. The DeePEn defaults are its reference
    implementation's settings.
    """

    method: Method = "deepen"
    """Fusion rule. `"deepen"`: relative space + inverse search (uses tau, top_k, top_mass,
    candidates, eta, steps); `"union"` (GaC): the members' whole distributions averaged
    over the union of their vocabularies by token text; `"unite"` (UniTE): the union of
    each member's `unite_top_k` tokens, each member scoring every candidate."""

    tau: float = Field(100.0, gt=0)
    """Temperature of the relative representation `softmax(tau * cos(E[v], E[anchors]))`.
    At 100 a token that is itself an anchor puts all its mass on that anchor."""

    top_k: int = Field(64, ge=1)
    """DeePEn fast path: most non-anchor tokens taken from each member's distribution (each
    costs a relative row); tokens that are anchors always enter, at no cost."""

    top_mass: float = Field(0.999, gt=0, le=1)
    """DeePEn fast path: non-anchor tokens enter in order of probability until those left
    out hold at most `1 - top_mass` of the member's probability (or `top_k` entered). The
    mass left out is dropped and the rest renormalised."""

    unite_top_k: int = Field(10, ge=1)
    """UniTE: tokens each member contributes to the candidate union (the paper's k = 10)."""

    gate: Literal["off", "agree", "confident"] = "off"
    """Per-step gate that skips fusion for a row (the main member's logits are used
    unchanged). `"agree"`: every member's most probable token has the same text (or all end
    the text); `"confident"`: the main member's top probability is at least
    `gate_threshold` (GaC's thresholded ensemble). `"off"`: fuse every step."""

    gate_threshold: float = Field(0.9, gt=0, le=1)
    """Top probability of the main member from which `gate="confident"` skips fusion."""

    candidates: int = Field(64, ge=1)
    """Size of the main member's own top set searched by the inverse transformation; the
    main member's tokens for the anchors the other members propose are always added."""

    eta: float = Field(0.15, ge=0)
    """Learning rate of the inverse search. `0` means the main member alone, exactly."""

    steps: int = Field(5, ge=0)
    """Optimiser steps of the inverse search (T). `0` means the main member alone."""

    main: Annotated[int | Literal["auto"], index_or("auto")] = "auto"
    """Index of the member whose vocabulary the fused token is chosen from (the leader).
    `"auto"`: per row, the member that reads the row's prompt best (lowest bits per byte;
    chat rows among the members with a chat template), fixed for the row; it costs one
    extra prefill (decoding/leaders.py)."""

    weights: list[float] | None = None
    """One non-negative weight per member, normalised to sum 1. `None`: uniform."""

    weighting: Weighting = "prompt"
    """How the weights apply at each step. `"fixed"`: `weights` as given. `"confidence"`:
    per row and step, each member's weight times its top probability, renormalised, so a
    sure member outweighs an unsure one (every method). `"prompt"` (PackLLM-sim): per row,
    fixed for the row, each member's weight times `exp(-bpb / weight_temperature)`,
    renormalised, where bpb is the member's bits per byte of the row's prompt, scored in
    its prefill (fusion/weights.py)."""

    weight_temperature: float = Field(0.03, gt=0)
    """Temperature of `weighting="prompt"`: the lower, the more the member that reads the
    prompt best (lowest bits per byte) dominates; a gap of one temperature in bits per
    byte is a weight ratio of e."""

    prompt_score: PromptScore = "second-half"
    """Which of the prompt's tokens the prompt score reads (`weighting="prompt"` and
    `main="auto"`): `"whole"`, every token, or `"second-half"`, the tokens from the middle
    byte of the prompt's text on, each read with all the prompt before it: how well the
    member has taken in the first half (decoding/prompt_scores.py)."""

    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay of the inverse search (reference: 0.01)."""

    schedule_t_max: int = Field(10, ge=1)
    """Cosine annealing period in steps (reference: 10)."""

    eta_min_ratio: float = Field(0.25, ge=0, le=1)
    """Floor of the cosine schedule as a fraction of `eta` (reference: eta / 4)."""

    min_anchors: int = Field(1000, ge=1)
    """Fewest shared anchor tokens accepted between members; fewer raises `AlignmentError`."""

    row_cache_size: int = Field(4096, ge=0)
    """Relative rows of non-anchor tokens kept per member after first use (LRU)."""

    fusion_device: str | None = None
    """Torch device of the aggregation, the inverse search and the fused logits (sampling
    and grammar masks follow them), such as `cuda:1`; none: the main member's device (the
    CPU for a member in a Ray actor). Each member's own part of fusion (its probabilities,
    top tokens, relative distribution) runs on its own device either way."""

    disk_cache_rows: int = Field(8192, ge=0)
    """Relative rows of non-anchor tokens kept on disk per member and anchor set (under
    `$DEEPEN_CACHE/relative-rows`), so a new process reads them instead of computing
    them. `0`: no disk cache."""

    @field_validator("fusion_device")
    @classmethod
    def _check_fusion_device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from .devices import device_problem

        problem = device_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @property
    def leader(self) -> int:
        """The fixed leader's index; with `main="auto"` the first member (each row's
        leader is chosen when it joins; see decoding/leaders.py).
        """
        return self.main if isinstance(self.main, int) else 0

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("weights must hold one number per member")
        for w in value:
            if math.isnan(w) or math.isinf(w) or w < 0:
                raise ValueError("weights must be finite and >= 0")
        if sum(value) <= 0:
            raise ValueError("weights must not all be zero")
        return value

    def check_members(self, n_members: int) -> None:
        """Raise `ConfigError` when `main` or `weights` do not fit `n_members` members."""
        if isinstance(self.main, int) and self.main >= n_members:
            fix = (
                f"is out of range for {n_members} members; give an index from 0 to {n_members - 1}."
            )
            raise ConfigError(
                f"FusionConfig.main={self.main} {fix}",
                field="main",
                owner="FusionConfig",
                reason=f"index {self.main} {fix}",
            )
        self.normalised_weights(n_members)

    def normalised_weights(self, n_members: int) -> list[float]:
        """The weights for `n_members` members, summing to 1."""
        if self.weights is None:
            return [1.0 / n_members] * n_members
        if len(self.weights) != n_members:
            reason = (
                f"has {len(self.weights)} values for {n_members} members; give one weight per "
                "member, in the members' order."
            )
            raise ConfigError(
                f"FusionConfig.weights {reason}",
                field="weights",
                owner="FusionConfig",
                reason=reason,
            )
        total = sum(self.weights)
        return [w / total for w in self.weights]


# FusionConfig fields as the adapters, the server and the command line name them: the same
# name, except `top_k`, which is public as `fusion_top_k` (a request's `top_k` samples).
REQUEST_FUSION_NAMES: dict[str, str] = {
    **{name: name for name in ("method", "main", "weights", "weighting", "weight_temperature")},
    **{name: name for name in ("prompt_score", "eta", "steps", "tau")},
    "fusion_top_k": "top_k",
    **{name: name for name in ("top_mass", "candidates", "unite_top_k", "gate", "gate_threshold")},
}
"""Public name -> FusionConfig field of every setting a request may change (`Ensemble.view`)."""

LOAD_FUSION_NAMES: dict[str, str] = {"min_anchors": "min_anchors", "fusion_device": "fusion_device"}
"""Public name -> FusionConfig field of the settings fixed when the members are aligned."""


class GenerationConfig(Settings):
    """How text is generated from the fused distribution."""

    max_new_tokens: int = Field(128, ge=1)
    """Most tokens of the main member to generate."""

    min_new_tokens: int = Field(0, ge=0)
    """Tokens generated before an end-of-sequence token may be chosen (as transformers'
    `min_new_tokens`): until then the main member's end tokens are masked out. Stop strings
    still end a row. `0`: no minimum."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end generation; the text is cut before the first one (on text, not
    tokens)."""

    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the fused distribution. `0`: greedy (argmax)."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    `1.0`: no cut."""

    top_k: int = Field(0, ge=0)
    """Sample among the top_k most likely tokens. `0`: no cut."""

    seed: int | None = None
    """Seed of each row's sampling (its n-th token is drawn at a number made from the seed
    and n): the same seed gives the same text for the same prompt, whatever the batch,
    the device or `speculate`. `None`: a fresh random seed per row."""

    logprobs: int | None = Field(None, ge=0, le=20)
    """Report each generated token's log-probability under the fused distribution (the
    distribution the token is chosen from, before temperature, top-k and top-p), with this
    many most likely alternatives per token (`0`: the chosen token only). `None`: off."""

    timeout: float | None = Field(None, gt=0)
    """Seconds a request may take from the moment it is made, waiting in the queue
    included; past it the request fails with `RequestTimeoutError` at the next step and
    its rows leave the batch. `None`: no limit."""

    truncation: Literal["error", "left"] = "error"
    """A prompt too long for a member's context window. `"error"`: a prompt that fills
    some member's window raises `ConfigError`. `"left"`: each member drops its own oldest
    prompt tokens (a leading BOS token is kept) so that prompt + `max_new_tokens` fits its
    window. Either way a row ends with `"length"` once any member's window is full."""

    json_schema: dict[str, Any] | None = None
    """Constrain the output to JSON that validates against this JSON schema (a dict).
    `{"type": "object"}`: any JSON object. The output is laid out as Python's
    `json.dumps` does (`", "` and `": "`, no other whitespace). `None`: no constraint. Needs the
    `constraints` extra (llguidance); see decoding/constraints.py."""

    regex: str | None = None
    """Constrain the output to match this regular expression (Rust `regex` syntax), whole.
    `None`: no constraint."""

    grammar: str | None = None
    """Constrain the output to this context-free grammar, in llguidance's Lark syntax
    (`start: ...`; `%json {schema}` embeds a JSON schema). `None`: no constraint."""

    speculate: int | None = Field(None, ge=0, le=16)
    """Speculative fused decoding: `drafter` proposes up to this many tokens a step, the fused
    distribution verifies them; the same output as `0` (off; docs/speculative.md). `None`: 4
    in process, 0 with members in Ray actors; standard steps anyway while more than
    `SchedulerConfig.speculate_max_rows` rows decode together, or under a constraint."""

    drafter: Annotated[int | Drafter, index_or(*get_args(Drafter))] = "main"
    """Who drafts for `speculate`: `"main"`, a member index (its greedy text), `"auto"` (fewest
    parameters; ties: lower index) or `"lookup"` (ids copied from the row's text; else main)."""

    @model_validator(mode="after")
    def _check_lengths(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidField(
                "min_new_tokens",
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                f"({self.max_new_tokens})",
            )
        return self

    @model_validator(mode="after")
    def _check_constraint(self) -> GenerationConfig:
        given = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if len(given) > 1:
            raise InvalidField(
                given[1],
                f"give at most one of json_schema, regex and grammar; got {', '.join(given)}",
            )
        if given:
            try:
                check_constraint(given[0], getattr(self, given[0]))
            except ValueError as exc:  # named, so the server can say `response_format`
                raise InvalidField(given[0], str(exc)) from None
        return self

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """`(field, value)` of the output constraint set, or None."""
        for f in CONSTRAINT_FIELDS:
            if getattr(self, f) is not None:
                return f, getattr(self, f)
        return None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        for i, s in enumerate(value):
            problem = text_problem(s, f"stop string {i}")
            if problem is not None:
                raise ValueError(problem)
        return value


CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar")
"""The `GenerationConfig` fields that constrain the output (at most one may be set)."""


class SchedulerConfig(Settings):
    """How concurrent requests share the members (continuous batching).

    Requests from any thread or task wait in one queue; between two decoding steps the
    waiting rows are prefilled and join the running batch, and finished rows leave it.
    """

    max_batch_size: int = Field(32, ge=1)
    """Most rows decoded together; more wait in the queue until rows finish."""

    max_queue: int = Field(256, ge=1)
    """Most requests waiting to start; one more raises `QueueFullError` at once."""

    prefill_chunk: int = Field(512, ge=0)
    """Most positions of a prompt fed to a member in one forward pass: a longer prompt is
    read in chunks, so attention's memory grows with chunk x prompt length, not with the
    prompt length squared. `0`: the whole prompt in one pass."""

    speculate_max_rows: int = Field(1, ge=0)
    """Most rows in the batch for speculative steps (`GenerationConfig.speculate`): with
    more, every row takes standard steps until rows leave (the same text, greedy and
    sampled alike). Verifying many rows' drafts makes the forwards compute-bound: on
    the 2-core CPU measured, greedy speculation was 1.5x faster at batch 1 but 0.91-1.01x
    at batch 2 and slower at 4 and 8 (docs/benchmarks.md). `0`: no limit."""

    draft_precision: DraftPrecision = "auto"
    """The precision of the main member's own drafts in speculative steps: `"bfloat16"` runs
    them through a copy of its body whose linear layers hold bfloat16 weights (half the
    body's float32 bytes more, per member once it leads); verification still reads the
    member's float32 logits at every drafted position, so the output is the same, only the
    share of drafts kept can change. `"float32"`: the member's own body. `"auto"`: bfloat16
    for a float32 member with an engine output layer where bfloat16 products are native
    (CPUs with AVX-512 BF16 or AMX, CUDA GPUs that support it), else float32."""
