"""The decoding loop: one prompt, every member in step, one fused token per step.

Steps of `decode` (a generator; `Ensemble.generate` aggregates it, so streamed and
non-streamed text can never disagree):

1. Tokenise the prompt with each member's tokenizer and prefill its KV cache.
2. Fuse the members' next-token logits into the main member's vocabulary.
3. Pick the token (greedy); the main member's end-of-sequence token ends generation.
4. Append it to the main member's ids and its bytes to the text; cut at a stop string.
5. Yield the text that is now final.
6. Sync every helper to the new text and feed each member only its new positions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .config import GenerationConfig
from .errors import ConfigError
from .fusion import Fuser
from .members import Member
from .sync import MemberState
from .text import TextAssembler


@dataclass
class Usage:
    """Token counts and time spent for one request."""

    completion_tokens: int = 0
    """Tokens the main member generated (an end-of-sequence token included)."""
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    """Prompt length in each member's own tokens, by member name."""
    fed_positions: dict[str, int] = field(default_factory=dict)
    """Positions each member fed after its prompt (the sync cost; ~1 per token is ideal)."""
    forward_seconds: dict[str, float] = field(default_factory=dict)
    """Time in each member's forward passes, prefill included."""
    fusion_seconds: float = 0.0
    """Time in fusion (relative space, inverse search)."""
    total_seconds: float = 0.0


@dataclass
class StreamEvent:
    """One streamed piece: a text delta, or the final event with `finish_reason` set."""

    delta: str = ""
    finish_reason: str | None = None
    """`"eos"`, `"length"` or `"stop"` on the final event, else None."""
    usage: Usage | None = None
    token_ids: list[int] | None = None
    """The main member's generated ids, on the final event."""


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    finish_reason: str
    token_ids: list[int]
    usage: Usage


def decode(
    members: Sequence[Member], fuser: Fuser, prompt: str, config: GenerationConfig
) -> Iterator[StreamEvent]:
    """Generate from `prompt` with the ensemble, yielding text deltas then a final event."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a str, got {type(prompt).__name__}.")
    start = time.perf_counter()
    main = fuser.main
    usage = Usage()
    # With identity fusion (eta 0, steps 0, a single member or all weight on the main
    # member) the other members cannot change the result: they are not run at all.
    identity = fuser.is_identity
    if identity:
        members = [members[main]]
        main = 0
    # 1. each member's own prompt ids, prefilled into its KV cache.
    states = []
    for m in members:
        ids = m.tokenizer(prompt, add_special_tokens=True).input_ids
        if not ids:
            raise ConfigError(
                f"The prompt {prompt!r} is empty in member {m.name!r}'s tokens; give some text."
            )
        states.append(MemberState(m, ids))
        usage.prompt_tokens[m.name] = len(ids)
    main_state, main_member = states[main], members[main]
    text = TextAssembler(config.stop)
    finish_reason = "length"
    try:
        for state in states:
            state.forward()
        for step in range(config.max_new_tokens):
            # 2. fuse the next-token distributions into the main vocabulary.
            t0 = time.perf_counter()
            logits = [s.logits for s in states]  # per member (1, V_i)
            fused = logits[main] if identity else fuser.fuse(logits)  # (1, V_main)
            usage.fusion_seconds += time.perf_counter() - t0
            # 3. greedy choice; the main member's EOS ends the row.
            token = int(fused[0].argmax())
            usage.completion_tokens += 1
            if token in main_member.eos_ids:
                finish_reason = "eos"
                break
            # 4. append to the main member and to the text.
            main_state.append(token)
            text.add(main_member.vocab.texts[token] or b"")
            if text.stopped:
                finish_reason = "stop"
                break
            # 5. hand out what is final.
            delta = text.delta()
            if delta:
                yield StreamEvent(delta=delta)
            if step == config.max_new_tokens - 1:
                break
            # 6. sync helpers to the text, then feed every member its new positions.
            t0 = time.perf_counter()
            for i, state in enumerate(states):
                if i != main:
                    state.sync_text(text.text)
            usage.fusion_seconds += time.perf_counter() - t0
            for state in states:
                state.forward()
        if finish_reason != "stop":
            text.finish()
            if text.stopped:
                finish_reason = "stop"
        delta = text.delta(final=True)
        if delta:
            yield StreamEvent(delta=delta)
        for m, state in zip(members, states):
            usage.fed_positions[m.name] = state.fed_positions
            usage.forward_seconds[m.name] = state.forward_seconds
        usage.total_seconds = time.perf_counter() - start
        yield StreamEvent(
            finish_reason=finish_reason, usage=usage, token_ids=list(main_state.generated_ids)
        )
    finally:
        for state in states:
            state.free()


def collect(events: Iterator[StreamEvent]) -> GenerationResult:
    """Aggregate a stream into one result."""
    parts: list[str] = []
    for event in events:
        parts.append(event.delta)
        if event.finish_reason is not None:
            assert event.usage is not None and event.token_ids is not None
            return GenerationResult(
                text="".join(parts),
                finish_reason=event.finish_reason,
                token_ids=event.token_ids,
                usage=event.usage,
            )
    raise RuntimeError("the decoding stream ended without a final event")
