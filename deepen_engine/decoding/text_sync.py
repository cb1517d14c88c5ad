"""How a helper's ids follow the shared text (`MemberBatch.plan_sync`): its ids must equal
its own tokenisation of `prompt + text`, and re-tokenising can change earlier tokens
(merges across the boundary). Only the tail of the text is re-tokenised, from a word
boundary a few tokens back (`safe_cut`), so a sync costs the same at token 10 and at token
10,000; the property tests check the ids equal a full tokenisation of the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

TAIL_TOKENS = 6  # a helper re-tokenises at least this many of its newest tokens
_SPACES = (b" ", b"\n", b"\t", b"\r")


def safe_cut(texts: Sequence[bytes | None], generated: list[int]) -> int:
    """Index of a generated token before which re-tokenising cannot change anything.

    A token that starts with a space followed by a non-space, after a token that ends in a
    non-space, starts a pre-token (byte-level BPE splits words there) or a word
    (SentencePiece BPE merges within words), so tokens before it are final. 0 (the whole
    generated text) when no such token lies at least `TAIL_TOKENS` back, or when a token
    without text (a special token matched in the text) makes offsets unclear. `texts`: the
    member's bytes of each token id.
    """
    for i in range(len(generated) - TAIL_TOKENS, 0, -1):
        word, before = texts[generated[i]], texts[generated[i - 1]]
        if not word or not before:
            return 0
        if word[:1] == b" " and word[1:2] not in (b"", b" ") and before[-1:] not in _SPACES:
            return i
    return 0


def plan_sync(
    prompt_ids: list[int],
    ids: list[int],
    ends: list[int],
    text: str,
    texts: Sequence[bytes | None],
    encode: Callable[[str], list[int]],
) -> tuple[list[int], list[int]]:
    """The ids and byte ends of each generated id a helper row holding `ids` (prompt, then
    generated ids ending at byte `ends[j]` of the text) must hold for `text`, a text that
    extends the one it holds; `encode` tokenises text without special tokens.
    """
    data = text.encode("utf-8")
    generated = ids[len(prompt_ids) :]
    cut = safe_cut(texts, generated)
    start = ends[cut - 1] if cut else 0
    tail_text = data[start:].decode("utf-8")
    tail = encode(tail_text) if tail_text else []
    new_ends = ends[:cut]
    for token in tail:
        new_ends.append((new_ends[-1] if new_ends else 0) + len(texts[token] or b""))
    return prompt_ids + generated[:cut] + tail, new_ends
