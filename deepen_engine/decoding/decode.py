"""`decode`: one batch of rows from start to end on a fresh `BatchDecoder` (a generator:
`Ensemble.generate` aggregates a stream, so streamed and non-streamed text can never
disagree). Tools and tests use it; requests go through the scheduler instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..config import GenerationConfig
from ..fusion import Fuser
from ..members import Member
from ..outputs import StreamEvent
from .loop import BatchDecoder
from .prompts import MemberPrompt
from .rows import DecodeHooks, NewRow


def decode(
    members: Sequence[Member],
    fuser: Fuser,
    prompts: Sequence[Sequence[MemberPrompt]],
    config: GenerationConfig,
    *,
    hooks: DecodeHooks | None = None,
    resume: Sequence[Sequence[int]] | None = None,
) -> Iterator[StreamEvent]:
    """Generate for one batch of rows, yielding text deltas and one final event per row.

    prompts[b][i] is row b's prompt for member i: (text, add_special_tokens). A plain
    prompt is the same text for all members, tokenised with the member's special tokens
    (e.g. BOS); a chat prompt is each member's own rendering, already holding them.
    `resume[b]`: main-member ids row b has already generated; they are prefilled (their
    text is not streamed again) and count toward `max_new_tokens` and `min_new_tokens`.
    """
    decoder = BatchDecoder(members, fuser.main, not fuser.is_identity, hooks)
    new = [
        NewRow(prompts=p, config=config, fuser=fuser, index=b, resume=(resume or [])[b])
        if resume
        else NewRow(prompts=p, config=config, fuser=fuser, index=b)
        for b, p in enumerate(prompts)
    ]
    try:
        decoder.join(decoder.prepare(new))
        while decoder.rows:
            for _, event in decoder.step():
                yield event
            if decoder.rows:
                decoder.advance()
    finally:
        decoder.close()
