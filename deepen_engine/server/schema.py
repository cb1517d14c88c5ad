"""The request bodies the server accepts, as pydantic models: the source of the strict
field check (an unknown top-level field is a 400 naming it) and of `/openapi.json`.

The models describe; `protocol.py` reads (it keeps OpenAI's parameter names in every error
and maps the fields to engine settings). The fields of both must agree:
tests/unit/test_server_strict.py checks every documented field is accepted.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import Method, PromptScore, Weighting


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class _Common(_Body):
    """Fields both endpoints read: OpenAI's, then deepen's extras."""

    model: str | None = None
    """Any name: the one ensemble serves every model name."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate (in the main member's tokens)."""
    stop: str | list[str] | None = None
    """Strings that end the answer (cut before the first one)."""
    temperature: float | None = Field(None, ge=0, le=2)
    """Sampling temperature of the fused distribution; 0 (the default): greedy."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling cut."""
    seed: int | None = None
    """Seed of the row's sampling (same seed, same prompt: same text)."""
    n: int | None = Field(None, ge=1, le=1)
    """Choices per prompt: 1 only."""
    stream: bool | None = None
    """Answer as server-sent events."""
    stream_options: dict[str, Any] | None = None
    """`{"include_usage": true}`: a last chunk with the usage (stream only)."""
    user: str | None = None
    """Ignored."""
    presence_penalty: float | None = None
    """Not supported: 0 or absent."""
    frequency_penalty: float | None = None
    """Not supported: 0 or absent."""
    logit_bias: dict[str, float] | None = None
    """Not supported: absent or empty."""
    # deepen's extras: sampling and constraints (GenerationConfig)
    top_k: int | None = Field(None, ge=0)
    """Sample among the top_k most likely fused tokens; 0: no cut."""
    min_tokens: int | None = Field(None, ge=0)
    """Tokens generated before an end token may be chosen."""
    truncation: Literal["error", "left"] | None = None
    """A prompt too long for a member: `error` (400) or `left` (drop the oldest tokens)."""
    speculate: int | None = Field(None, ge=0, le=16)
    """Speculative decoding: tokens the main member drafts per step (0: off)."""
    drafter: int | Literal["main", "auto", "lookup"] | None = None
    """Speculative decoding: who drafts, `main`, `auto` (the smallest member) or an index."""
    timeout: float | None = Field(None, gt=0)
    """Seconds the request may take, waiting included; 408 past it."""
    regex: str | None = None
    """Constrain the answer to this regular expression."""
    grammar: str | None = None
    """Constrain the answer to this Lark grammar (llguidance syntax)."""
    # deepen's extras: fusion (FusionConfig, see config.REQUEST_FUSION_NAMES)
    method: Method | None = None
    """Fusion rule: deepen, union (GaC) or unite (UniTE)."""
    main: int | Literal["auto"] | None = Field(None, ge=0)
    """Index of the member whose vocabulary the answer is written in; `"auto"`: the member
    that reads the prompt best (lowest bits per byte)."""
    weights: list[float] | None = None
    """One non-negative weight per member."""
    weighting: Weighting | None = None
    """`fixed` weights, scaled per step by each member's top probability (`confidence`),
    or by how well each member reads the prompt (`prompt`)."""
    weight_temperature: float | None = Field(None, gt=0)
    """`weighting="prompt"`: temperature of the softmax over the members' prompt bits per
    byte."""
    prompt_score: PromptScore | None = None
    """The prompt's tokens the prompt score reads: `whole` or `second-half`."""
    eta: float | None = Field(None, ge=0)
    """DeePEn inverse-search learning rate; 0: the main member alone."""
    steps: int | None = Field(None, ge=0)
    """DeePEn inverse-search steps."""
    tau: float | None = Field(None, gt=0)
    """DeePEn relative-representation temperature."""
    fusion_top_k: int | None = Field(None, ge=1)
    """DeePEn fast path: most non-anchor tokens per member."""
    top_mass: float | None = Field(None, gt=0, le=1)
    """DeePEn fast path: probability mass kept per member."""
    candidates: int | None = Field(None, ge=1)
    """DeePEn: main-member tokens searched by the inverse transformation."""
    unite_top_k: int | None = Field(None, ge=1)
    """UniTE: tokens each member adds to the candidate union."""
    gate: Literal["off", "agree", "confident"] | None = None
    """Skip fusion on steps where the members agree or the main member is sure."""
    gate_threshold: float | None = Field(None, gt=0, le=1)
    """Top probability from which `gate=confident` skips fusion."""


class ChatRequest(_Common):
    """A `/v1/chat/completions` body."""

    messages: list[dict[str, Any]]
    """The conversation: system, developer, user, assistant and tool messages."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate (wins over max_tokens)."""
    logprobs: bool | None = None
    """Report each answer token's log-probability."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """Alternatives per token (needs logprobs=true)."""
    tools: list[dict[str, Any]] | None = None
    """Function specs `{"type": "function", "function": {...}}` the answer may call."""
    tool_choice: str | dict[str, Any] | None = None
    """`auto`, `none`, `required` or one named function."""
    parallel_tool_calls: bool | None = None
    """Ignored: an answer holds at most one call."""
    response_format: dict[str, Any] | None = None
    """`{"type": "text" | "json_object" | "json_schema", ...}`."""
    metadata: dict[str, Any] | None = None
    """Ignored."""
    store: bool | None = None
    """Ignored."""
    service_tier: str | None = None
    """Ignored."""
    functions: list[dict[str, Any]] | None = None
    """Legacy: refused with a 400 (send tools)."""
    function_call: str | dict[str, Any] | None = None
    """Legacy: refused with a 400 (send tool_choice)."""


class CompletionRequest(_Common):
    """A `/v1/completions` body."""

    prompt: str | list[str]
    """The text(s) to continue: one choice per prompt."""
    logprobs: int | None = Field(None, ge=0, le=5)
    """Report each token's log-probability with this many alternatives."""
    best_of: int | None = Field(None, ge=1, le=1)
    """1 only."""
    echo: bool | None = None
    """Not supported: false or absent."""
    suffix: str | None = None
    """Not supported: absent."""


CHAT_FIELDS = frozenset(ChatRequest.model_fields)
COMPLETION_FIELDS = frozenset(CompletionRequest.model_fields)


def unknown_field(body: dict[str, Any], chat: bool) -> tuple[str, str] | None:
    """`(field, message)` for the first top-level field of `body` the endpoint does not
    know (OpenAI's "Unrecognized request argument", with the closest known name), or None.
    """
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    name = next((k for k in body if k not in known), None)
    if name is None:
        return None
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; leave it out."
    return name, f"Unrecognized request argument supplied: {name!r}{hint}"
