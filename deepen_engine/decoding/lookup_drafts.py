"""Prompt-lookup drafting (`GenerationConfig.drafter="lookup"`) for speculative decoding
(speculative.py): a row's draft is the main-member ids that followed the latest earlier
occurrence of its last few ids, in its own prompt and generated text. No model runs to
draft, so a step costs one forward per member (the main member reads the proposal as in
cross_drafts.py step 4) plus the fusion of the verified positions.

It pays where outputs copy their input: few-shot prompts (the next question's framing),
retrieved passages quoted in answers, code edits, JSON keys. Where the row's tail never
occurred before, the main member drafts that step as with `drafter="main"`. Acceptance.py
keeps proposed tokens while they equal plain decoding's choice, as for a helper's draft:
output is unchanged.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from .member_batch import MemberBatch

LOOKUP = -1  # the drafter "position" of prompt lookup (no member drafts)
LONGEST_MATCH = 3  # ids of the row's tail looked up, longest first


def lookup_proposals(
    main: MemberBatch, lengths: list[int], drafters: list[int]
) -> dict[int, list[int]]:
    """The proposals of the rows drafting by prompt lookup (`drafters[b] == LOOKUP`), each
    up to `lengths[b]` of the main member's ids.
    """
    member = main.member
    return {
        b: lookup_ids(main.rows[b].ids, n, member.vocab.texts, member.eos_ids)
        for b, n in enumerate(lengths)
        if n and drafters[b] == LOOKUP
    }


def lookup_ids(
    ids: Sequence[int], limit: int, texts: Sequence[bytes | None], eos: Container[int]
) -> list[int]:
    """Up to `limit` ids that followed the latest earlier occurrence of the last n of
    `ids` (n = LONGEST_MATCH down to 1: the longest tail that occurs before), cut before
    the first end token (`eos`) or token without text (`texts`); [] where no tail recurs.
    """
    end = len(ids)
    for n in range(min(LONGEST_MATCH, end - 1), 0, -1):
        tail = list(ids[end - n :])
        last = tail[-1]
        for start in range(end - n - 1, -1, -1):  # the latest occurrence first
            if ids[start + n - 1] == last and list(ids[start : start + n]) == tail:
                out: list[int] = []
                for token in ids[start + n : start + n + limit]:
                    if token in eos or texts[token] is None:
                        break
                    out.append(token)
                if out:
                    return out
                break  # what followed this tail was an end: try a shorter tail
    return []
