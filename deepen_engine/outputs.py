"""What generation hands back: `StreamEvent`s as text is decided, `GenerationResult`s when
rows finish, each row's `Usage`, and the `ToolCall`s of a reply that calls tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One tool call of a reply (chat requests with `tools`)."""

    id: str
    """A fresh id, `call_<24 hex digits>`, for the tool result to refer to."""
    name: str
    """The tool's name, one of the request's tools."""
    arguments: dict[str, Any]
    """The arguments, parsed (with a constraint they validate against the tool's schema)."""

    @property
    def arguments_json(self) -> str:
        """The arguments as a JSON string (OpenAI's `function.arguments`)."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Usage:
    """Token counts of one row, and the time spent by the batch it ran in."""

    completion_tokens: int = 0
    """Tokens the main member generated (an end-of-sequence token included)."""
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    """Prompt length in each member's own tokens, by member name."""
    fed_positions: dict[str, int] = field(default_factory=dict)
    """Positions each member fed after its prompt (the sync cost; ~1 per token is ideal)."""
    forward_seconds: dict[str, float] = field(default_factory=dict)
    """Time in each member's forward passes (prefill included), for the whole batch."""
    fusion_seconds: float = 0.0
    """Time in fusion, sampling and sync (everything but forwards), for the whole batch."""
    total_seconds: float = 0.0
    """Wall time from the start of the batch to this row's end."""
    leader: str = ""
    """The member that wrote the row (its main member; with `main="auto"` chosen per row)."""
    prompt_bits_per_byte: dict[str, float | None] = field(default_factory=dict)
    """Each member's negative log-likelihood of its own prompt tokens, in bits per UTF-8
    byte, by member name (lower: the member reads the prompt better); filled for rows whose
    fusion reads it (`FusionConfig.weighting="prompt"`), None for a prompt too short to
    score. See decoding/prompt_scores.py."""
    drafted_tokens: int = 0
    """Speculative decoding (`GenerationConfig.speculate`): tokens drafted (by the main
    member, or proposed by `GenerationConfig.drafter`, counted in main-member tokens)."""
    accepted_tokens: int = 0
    """Speculative decoding: drafted tokens the fused distribution kept."""
    drafts: int = 0
    """Speculative decoding: steps in which the row drafted."""
    resyncs: int = 0
    """Speculative decoding: drafted positions whose text did not end on a boundary of some
    helper's tokens, where its draft was kept so far and the helpers were re-synced to read
    on (decoding/speculative.py, step 5)."""

    def token_counts(self, main: str) -> dict[str, int]:
        """OpenAI-style counts: `prompt_tokens` (in the tokens of the member that wrote the
        row, `leader`, else `main`: the vocabulary the answer is written in),
        `completion_tokens` and `total_tokens`.
        """
        prompt = int(self.prompt_tokens.get(self.leader or main, 0))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


@dataclass
class TokenLogprob:
    """A token's log-probability under the fused distribution (see
    `GenerationConfig.logprobs`).
    """

    token: str
    """The token's text (its bytes decoded; an incomplete character shows as U+FFFD)."""
    id: int
    """The token's id in the main member's vocabulary."""
    logprob: float
    bytes: list[int]
    """The token's UTF-8 bytes."""
    top: list[TokenLogprob] = field(default_factory=list)
    """The most likely tokens at this step, best first (`GenerationConfig.logprobs` of
    them); empty for the entries of this list themselves."""


@dataclass
class StreamEvent:
    """One streamed piece of row `index`: a text delta, or its final event."""

    delta: str = ""
    index: int = 0
    """The row (position of the prompt in the request)."""
    finish_reason: str | None = None
    """`"eos"`, `"length"`, `"stop"` or `"tool_calls"` on the row's final event, else None."""
    usage: Usage | None = None
    token_ids: list[int] | None = None
    """The main member's generated ids, on the final event."""
    tool_calls: list[ToolCall] | None = None
    """The reply's tool calls, on the final event of a reply that calls tools (its
    finish_reason is then `"tool_calls"`); None otherwise."""
    logprobs: list[TokenLogprob] | None = None
    """With `GenerationConfig.logprobs` set: the tokens chosen since the row's previous
    event (text can lag its tokens: incomplete characters and stop-string prefixes are
    held back). An end-of-sequence token is not listed."""


@dataclass
class Progress:
    """How far a request has come, for progress bars (`Ensemble.stream(progress=...)`)."""

    stage: str
    """`"prefill"`: a member reads the prompts; `"generate"`: tokens are chosen."""
    done: int
    """Prefill: prompt positions the member has read. Generate: tokens chosen so far, all
    of the request's rows together."""
    total: int
    """Prefill: positions to read. Generate: the most tokens the rows may choose (the sum
    of their `max_new_tokens`; rows that end early end the request sooner)."""
    member: str | None = None
    """Prefill: the member reading; None for generate."""


@dataclass
class GenerationResult:
    """A finished row."""

    text: str
    """The reply's text (empty for a reply that is a tool call)."""
    finish_reason: str
    """`"eos"`, `"length"` (`max_new_tokens` reached: a constrained structure may be
    incomplete), `"stop"` (a stop string) or `"tool_calls"`."""
    token_ids: list[int]
    usage: Usage
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Parsed tool calls (chat requests with `tools`); empty for a text reply."""
    logprobs: list[TokenLogprob] | None = None
    """Every generated token's log-probability, with `GenerationConfig.logprobs` set."""


def collect(events: Iterable[StreamEvent], n_rows: int) -> list[GenerationResult]:
    """Aggregate a stream of `n_rows` rows into one result per row, in row order."""
    parts: list[list[str]] = [[] for _ in range(n_rows)]
    logprobs: list[list[TokenLogprob] | None] = [None] * n_rows
    results: list[GenerationResult | None] = [None] * n_rows
    for event in events:
        parts[event.index].append(event.delta)
        if event.logprobs is not None:
            logprobs[event.index] = (logprobs[event.index] or []) + event.logprobs
        if event.finish_reason is not None:
            assert event.usage is not None and event.token_ids is not None
            results[event.index] = GenerationResult(
                text="".join(parts[event.index]),
                finish_reason=event.finish_reason,
                token_ids=event.token_ids,
                usage=event.usage,
                tool_calls=list(event.tool_calls or []),
                logprobs=logprobs[event.index],
            )
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"the decoding stream ended without final events for rows {missing}")
    return [r for r in results if r is not None]
