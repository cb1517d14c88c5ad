"""Prompt scores: how well each member reads a row's prompt, from the prefill's own logits.

A member's score of a prompt is its negative log-likelihood of its own prompt tokens, in
bits per UTF-8 byte of the text those tokens cover (PackLLM, arXiv 2404.11531, compares
models by prompt perplexity; across tokenizers only a per-byte figure compares: a tokenizer
with longer tokens has a higher per-token perplexity for the same text). Steps:

1. While a row's prompt is prefilled, the member keeps the logits of every position fed
   (not only the last), in passes of at most `SCORE_LOGITS_BUDGET` logits, so memory stays
   bounded for a 262k vocabulary; a chunked prefill scores every chunk.
2. Position t's logits predict token t + 1: each prompt token from the second of the
   member's own tokenisation on is scored once (`RowScore.next` remembers how far), as
   `-log_softmax(logits)[token]`. Tokens without text (BOS, chat markers) are skipped:
   they are the template, not the prompt's text, and cover no bytes.
3. `bits_per_byte = nll_nats / ln 2 / bytes`, bytes being the UTF-8 bytes the scored
   tokens write. A prompt of one text token has no score (None).
4. `FusionConfig.prompt_score` says which tokens are scored (`RowScore.span`): `"whole"`,
   every token as above, or `"second-half"`, only the tokens that start at or after the
   middle byte of the prompt's text, each still read with the whole prompt before it. The
   first half of a prompt is read cold; the second half measures how well the member has
   taken in what came before (a few-shot prompt's pattern, a document's subject), which
   is what its continuation depends on (measured in docs/evaluation.md). Positions whose
   prediction is not scored are fed without their logits (`logits_to_keep`), so the
   second half costs half the output layer.

Computing every position's logits costs the output layer over the whole prompt (for
Gemma-3-270m more than the rest of its prefill); it runs only for rows whose fusion reads
the scores (`FusionConfig.weighting="prompt"`), not as an extra forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCORE_LOGITS_BUDGET = 1 << 25
"""Most logits (batch x positions x vocabulary, float32: 128 MiB) one scoring pass keeps."""


TokenTexts = Sequence[bytes | None]
"""Each token id's UTF-8 text (None or b"" for special tokens): `CanonicalVocab.texts`."""


@dataclass
class RowScore:
    """One row's running prompt score in one member."""

    span: str = "whole"  # the tokens scored: "whole" or "second-half" (step 4)
    nll: float = 0.0  # nats, summed over the scored tokens
    bytes: int = 0  # UTF-8 bytes the scored tokens write
    tokens: int = 0  # tokens scored
    next: int = 1  # index of the next prompt token to score (the first has no prediction)
    started: bool = False  # whether `begin` placed `next` at the span's first token

    def begin(self, prompt_ids: Sequence[int], texts: TokenTexts) -> None:
        """Place `next` at the span's first token (once, before the first pass): token 1
        for the whole prompt; for its second half, the first token starting at or after
        the middle byte (none: nothing to score).
        """
        if self.started:
            return
        self.started = True
        if self.span == "whole":
            return
        sizes = [len(texts[t] or b"") if t < len(texts) else 0 for t in prompt_ids]
        middle = sum(sizes) / 2
        written = 0
        for t, size in enumerate(sizes):
            if t >= 1 and written >= middle:
                self.next = max(self.next, t)
                return
            written += size
        self.next = max(self.next, len(prompt_ids))

    @property
    def bits_per_byte(self) -> float | None:
        """The score, or None while no byte was scored."""
        if self.bytes == 0:
            return None
        return self.nll / math.log(2) / self.bytes


def logits_kept(
    pending: Sequence[Sequence[int]], starts: Sequence[int], scores: Sequence[RowScore]
) -> int:
    """How many of a scoring pass's last positions need their logits: from the position
    predicting the earliest token still to score (`next - 1`) to the pass's end, over the
    rows (ids right-aligned); at least 1 (the next-token logits).
    """
    kept = 1
    for fed, start, score in zip(pending, starts, scores):
        if fed:
            kept = max(kept, min(len(fed), start + len(fed) - score.next + 1))
    return kept


def score_width(batch: int, vocab: int, limit: int) -> int:
    """Positions per row a scoring pass may feed: `limit`, cut so that the kept logits
    (batch x positions x vocab) stay within `SCORE_LOGITS_BUDGET`; at least 1.
    """
    return max(1, min(limit, SCORE_LOGITS_BUDGET // max(1, batch * vocab)))


def score_pass(
    logits: torch.Tensor,
    pending: Sequence[Sequence[int]],
    starts: Sequence[int],
    rows_ids: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    texts: Sequence[bytes | None],
    scores: Sequence[RowScore],
) -> None:
    """Add one forward pass to the rows' scores.

    logits: (B, W, V) of the pass's last W positions (`logits_kept`), each row's
    `pending[b]` ids right-aligned;
    `starts[b]` is the position of row b's first fed id, `rows_ids[b]` all its ids,
    `prompt_lengths[b]` how many of them are its prompt (resumed ids are not scored).
    """
    width = logits.shape[1]
    for b, (fed, start, ids, length, score) in enumerate(
        zip(pending, starts, rows_ids, prompt_lengths, scores)
    ):
        # tokens start + 1 .. start + len(fed) are predicted by this pass's positions
        first = max(score.next, start + 1)
        last = min(start + len(fed), length - 1)
        if first > last:
            continue
        targets = [ids[t] for t in range(first, last + 1)]
        offset = width - len(fed) - start - 1  # token t is predicted at logits index t + offset
        logp = torch.log_softmax(logits[b, first + offset : last + offset + 1].float(), dim=-1)
        picked = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None]).squeeze(1)
        for token, value in zip(targets, picked.tolist()):
            text = texts[token] if token < len(texts) else None
            if not text:
                continue  # a special token: not the prompt's text
            score.nll -= value
            score.bytes += len(text)
            score.tokens += 1
        score.next = last + 1
