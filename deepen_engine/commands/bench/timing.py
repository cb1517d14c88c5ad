"""Measuring tools of `deepen bench`: members alone through transformers' `generate`, the
ensemble through the engine's own decoding loop (`decode`, with hooks to time each step or
to make the helpers re-encode their text like the reference implementation), and memory.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...config import GenerationConfig
from ...decoding.decode import decode
from ...decoding.member_batch import MemberBatch
from ...decoding.prompt_scores import score_pass
from ...decoding.rows import DecodeHooks, StepRecord
from ...ensemble import Ensemble
from ...members import Member
from ...remote.batch import new_batch


class _TokenClock:
    """A transformers streamer that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:  # noqa: D102 (streamer protocol)
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:  # noqa: D102 (streamer protocol)
        pass


def _left_padded(member: Member, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [member.tokenizer(p).input_ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(member), dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids.to(member.device), mask.to(member.device)


def _pad_id(member: Member) -> int:
    pad = member.tokenizer.pad_token_id
    if pad is None:
        pad = min(member.eos_ids) if member.eos_ids else 0
    return int(pad)


def member_alone(
    member: Member, prompts: Sequence[str], n: int, *, warm_up: bool = True
) -> list[float]:
    """Seconds from the start to each of `n` new tokens, for `member.model.generate` on
    these prompts (left-padded batch, greedy, its KV cache, exactly n tokens).
    """
    ids, mask = _left_padded(member, prompts)
    ids, mask = ids.to(member.device), mask.to(member.device)
    kwargs: dict[str, Any] = dict(
        attention_mask=mask, do_sample=False, pad_token_id=_pad_id(member)
    )
    with torch.no_grad():
        if warm_up:
            member.model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        clock = _TokenClock()
        start = time.perf_counter()
        member.model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kwargs)
    return [t - start for t in clock.times]


def ensemble_run(ens: Ensemble, prompts: Sequence[str], n: int) -> dict[str, float]:
    """One `Ensemble.generate` of exactly n tokens per prompt, standard steps (the
    speculative section times `speculate`): wall and split seconds.
    """
    context = ens.fuser.context  # shared by every fuser of the ensemble (views included)
    fused_before = context.fusion_seconds if context is not None else 0.0
    start = time.perf_counter()
    results = ens.generate(list(prompts), max_new_tokens=n, min_new_tokens=n, speculate=0)
    wall = time.perf_counter() - start
    usage = results[-1].usage  # the batch's figures (forwards and fusion are per batch)
    return {
        "seconds": wall,
        "forward_seconds": sum(usage.forward_seconds.values()),
        "fusion_seconds": usage.fusion_seconds,
        "fuse_seconds": (context.fusion_seconds - fused_before) if context is not None else 0.0,
        "tokens": sum(r.usage.completion_tokens for r in results),
    }


def timed_decode(
    ens: Ensemble,
    prompt: str,
    n: int,
    *,
    min_new_tokens: int = 0,
    reencode: bool = False,
    resume: Sequence[int] = (),
    on_step: Callable[[StepRecord], None] | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy fused decoding of one prompt through the engine's loop, n tokens after the
    `resume` ids (main-member ids already generated, prefilled, not timed).

    Helpers stay in step through their KV caches (`reencode=False`, what the engine does)
    or re-encode prompt + text from scratch every step (`reencode=True`, the reference
    implementation's way). `min_new_tokens` counts the resumed ids. Returns the new ids
    and, for each, the time of its choice (seconds; only differences are meaningful).
    """
    times: list[float] = []

    def watch(record: StepRecord) -> None:
        times.append(time.perf_counter())
        if on_step is not None:
            on_step(record)

    hooks = DecodeHooks(helper_batch=ReencodingBatch if reencode else new_batch, on_step=watch)
    total = len(resume) + n
    config = GenerationConfig(
        max_new_tokens=total, min_new_tokens=min(min_new_tokens, total), speculate=0
    )
    prompts = [[(prompt, True)] * len(ens.members)]
    ids: list[int] = []
    for event in decode(ens.members, ens.fuser, prompts, config, hooks=hooks, resume=[resume]):
        if event.finish_reason is not None:
            ids = (event.token_ids or [])[len(resume) :]
    return ids, times


class ReencodingBatch(MemberBatch):
    """A helper member without a KV cache: every step it re-encodes its prompt and its
    whole generated text and runs one full forward pass per row (the reference
    implementation's way, the bench's baseline). Its ids are the same as a synced helper's.
    """

    def sync_text(self, row: int, text: str) -> None:
        """Re-tokenise the row's whole generated text."""
        r = self.rows[row]
        r.ids = r.prompt_ids + (self._encode(text) if text else [])

    def forward(self, on_fed: Callable[[int, int], None] | None = None) -> None:
        """A full forward pass over each row's ids (no cache; no chunks, no progress); the
        first scores the prompt when the fusion reads prompt scores, as a prefill does.
        """
        start = time.perf_counter()
        logits = []
        texts = self.member.vocab.texts
        with torch.no_grad():
            for r in self.rows:
                ids = torch.tensor([r.ids], device=self.member.device)
                first = self.score_prompts and r.cached == 0
                if first:
                    r.score.begin(r.prompt_ids, texts)
                out = self.member.model(input_ids=ids, logits_to_keep=0 if first else 1)
                if first:  # every position's logits: each prompt token's likelihood
                    score_pass(
                        out.logits, [r.ids], [0], [r.ids], [len(r.prompt_ids)], texts, [r.score]
                    )
                logits.append(out.logits[:, -1, :].float())  # on its device, as MemberBatch
                r.fed_positions += len(r.ids) if r.cached else 0  # every step re-feeds all
                r.cached = len(r.ids)
        self.logits = torch.cat(logits)
        self.forward_seconds += time.perf_counter() - start


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tensor_mb(tensors: Any) -> float:
    """MiB held by these tensors."""
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def kv_cache_mb(member: Member, batch: int, positions: int) -> float:
    """Keys and values of every layer for `batch` rows of `positions` tokens."""
    cfg = member.model.config
    cfg = getattr(cfg, "text_config", cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_hidden_layers * heads * head_dim * member.dtype.itemsize
    return per_position * batch * positions / 2**20
