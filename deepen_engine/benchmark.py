"""`deepen bench`: what an ensemble costs next to its members, and how close its fast path
comes to the full computation.

    deepen bench                                  # the default members
    deepen bench --json --plot bench.png          # every figure as JSON, and a plot

Sections (each a key of the JSON output; docs/benchmarks.md describes every field):

- `speed`: milliseconds per decoding step (one new token for each row) at each batch size,
  for each member alone (transformers `generate` with its KV cache, same prompts, same
  number of new tokens) and for the ensemble (`Ensemble.generate`); the ratio ensemble /
  sum of members, and the share of the ensemble's time spent outside member forwards
  (fusion, sampling, helper sync, text).
- `length`: ms per token at L new tokens (mean of the 8 steps ending there) at batch 1,
  for the ensemble, the sum of the members alone and a re-encoding baseline (the same
  fusion, but every helper re-encodes its whole text each step, as the reference
  implementation does); the speed-up over the baseline at 128 tokens and at the longest
  length.
- `memory`: peak resident memory of this process against the members' weights, their KV
  caches at the largest run, and the relative-space tensors.
- `fidelity`: on fixed prompts, the share of steps where the fast path (top-k) picks the
  same token as the full-vocabulary reference fusion (reference_fusion.py).

Every run uses `min_new_tokens`, so all rows generate exactly the asked number of tokens.
Timings on a shared CPU vary by 10-30% from run to run: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .ensemble import Ensemble
from .errors import ConfigError
from .members import Member
from .plotting import plot_bench
from .reference_fusion import ReferenceFuser
from .sync import MemberBatch
from .text import TextAssembler

WINDOW = 8  # steps averaged for the ms/token at one length

PROMPTS = (
    "The history of the city of Paris begins",
    "Once upon a time, in a small village by the sea,",
    "The main causes of the French Revolution were",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    ",
    "Q: What is the capital of Japan?\nA:",
    "The three laws of motion describe",
    "In 1969, the first humans to walk on the Moon",
)


def _prompts(size: int) -> list[str]:
    """The first `size` benchmark prompts (cycling through them past 8)."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(size)]


# --- timing helpers -------------------------------------------------------------------


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
    """One `Ensemble.generate` of exactly n tokens per prompt: wall and split seconds."""
    start = time.perf_counter()
    results = ens.generate(list(prompts), max_new_tokens=n, min_new_tokens=n)
    wall = time.perf_counter() - start
    usage = results[-1].usage  # the batch's figures (forwards and fusion are per batch)
    return {
        "seconds": wall,
        "forward_seconds": sum(usage.forward_seconds.values()),
        "fusion_seconds": usage.fusion_seconds,
        "tokens": sum(r.usage.completion_tokens for r in results),
    }


def ensemble_token_times(ens: Ensemble, prompt: str, n: int) -> tuple[list[float], list[int]]:
    """Seconds from the start to each new token (batch 1, exactly n tokens), and the ids.

    Streamed text is final once a token's bytes complete it, so each text delta marks the
    step whose token it ends; steps that complete no text (part of a character) take the
    time of the next delta.
    """
    start = time.perf_counter()
    marks: list[tuple[int, float]] = []  # (text bytes so far, time)
    size = 0
    ids: list[int] = []
    for event in ens.stream(prompt, max_new_tokens=n, min_new_tokens=n):
        if event.delta:
            size += len(event.delta.encode("utf-8"))
            marks.append((size, time.perf_counter() - start))
        if event.finish_reason is not None:
            ids = event.token_ids or []
    texts = ens.main.vocab.texts
    times: list[float] = []
    ends, total = [], 0
    for token in ids:
        total += len(texts[token] or b"")
        ends.append(total)
    m = 0
    for end in ends:
        while m < len(marks) - 1 and marks[m][0] < end:
            m += 1
        times.append(marks[m][1] if marks else 0.0)
    return times, ids


# --- the mini decoding loop (baseline and fidelity) -----------------------------------


@dataclass
class StepLog:
    """What `follow` saw at one step."""

    logits: list[torch.Tensor]  # per member (V_i,) next-token logits
    token: int  # the fast path's choice


def follow(
    ens: Ensemble,
    prompt: str,
    n: int,
    *,
    reencode: bool,
    on_step: Callable[[StepLog], None] | None = None,
    min_new_tokens: int = 0,
    prefix: Sequence[int] = (),
) -> tuple[list[int], list[float]]:
    """Greedy fused decoding of one prompt, as `Ensemble.generate` does it, one row.

    The main member keeps its KV cache. Helpers either stay in step through `MemberBatch`
    (`reencode=False`, what the engine does) or re-encode prompt + text from scratch every
    step (`reencode=True`, the reference implementation's way). `prefix`: main-member ids
    already generated (prefilled, not timed), to time steps deep into a long text. Returns
    the n new ids and, for each, the seconds from the end of the prefill to its choice.
    """
    members, fuser = ens.members, ens.fuser
    main = fuser.main
    eos = sorted(members[main].eos_ids)
    prompt_ids = [m.tokenizer(prompt).input_ids for m in members]
    text = TextAssembler()
    for token in prefix:
        text.add(members[main].vocab.texts[token] or b"")
    cached = {main: MemberBatch(members[main], [prompt_ids[main] + list(prefix)])}
    if not reencode:
        for i, m in enumerate(members):
            if i != main:
                cached[i] = MemberBatch(m, [prompt_ids[i]])
                cached[i].sync_text(0, text.text)
    ids: list[int] = []
    times: list[float] = []
    try:
        for batch in cached.values():
            batch.forward()
        start = time.perf_counter()
        for step in range(len(prefix), len(prefix) + n):
            logits = []
            for i, m in enumerate(members):
                if i in cached:
                    logits.append(cached[i].logits)
                    continue
                generated = m.tokenizer(text.text, add_special_tokens=False).input_ids
                full = torch.tensor([prompt_ids[i] + generated], device=m.device)
                with torch.no_grad():
                    out = m.model(input_ids=full, logits_to_keep=1)
                logits.append(out.logits[:, -1, :].float().cpu())
            fused = fuser.fuse(logits)[0]
            if step < min_new_tokens and eos:
                fused[eos] = float("-inf")
            token = int(fused.argmax())
            if on_step is not None:
                on_step(StepLog([x[0] for x in logits], token))
            ids.append(token)
            times.append(time.perf_counter() - start)
            if token in members[main].eos_ids:
                break
            text.add(members[main].vocab.texts[token] or b"")
            cached[main].append(0, token)
            for i, batch in cached.items():
                if i != main:
                    batch.sync_text(0, text.text)
            for batch in cached.values():
                batch.forward()
    finally:
        for batch in cached.values():
            batch.free()
    return ids, times


# --- sections -------------------------------------------------------------------------


def speed(ens: Ensemble, n: int, batch_sizes: Sequence[int], tick: Callable[[], None]) -> dict:
    """Ms per decoding step for each member alone and the ensemble, per batch size.

    A first ensemble run over the largest batch's prompts fills the relative-row caches,
    so the table's ensemble figures are the steady state of a long-lived process; that
    first run is reported on its own as `cold_run`.
    """
    largest = _prompts(max(batch_sizes))
    cold = ensemble_run(ens, largest, n)
    tick()
    rows = []
    for size in batch_sizes:
        prompts = _prompts(size)
        alone = {}
        for m in ens.members:
            alone[m.name] = member_alone(m, prompts, n)[-1] * 1000 / n
            tick()
        run = ensemble_run(ens, prompts, n)
        tick()
        total = sum(alone.values())
        ms = run["seconds"] * 1000 / n
        rows.append(
            {
                "batch_size": size,
                "new_tokens": n,
                "members_alone_ms": {k: round(v, 2) for k, v in alone.items()},
                "sum_of_members_ms": round(total, 2),
                "ensemble_ms": round(ms, 2),
                "ratio_ensemble_to_sum": round(ms / total, 3),
                "ensemble_forward_ms": round(run["forward_seconds"] * 1000 / n, 2),
                "fusion_only_ms": round(run["fusion_seconds"] * 1000 / n, 2),
                "fusion_only_share": round(run["fusion_seconds"] / run["seconds"], 4),
                "ensemble_tokens_per_second": round(run["tokens"] / run["seconds"], 2),
            }
        )
    return {
        "cold_run": {
            "batch_size": len(largest),
            "ensemble_ms": round(cold["seconds"] * 1000 / n, 2),
            "fusion_only_ms": round(cold["fusion_seconds"] * 1000 / n, 2),
            "fusion_only_share": round(cold["fusion_seconds"] / cold["seconds"], 4),
        },
        "rows": rows,
    }


def length_curve(ens: Ensemble, n: int, tick: Callable[[], None]) -> dict:
    """Ms per token at each length, batch 1: ensemble, members alone, re-encoding baseline.

    The ensemble generates n tokens once, noting when each token comes; its cost at
    length L is the mean of steps L-7..L. The members alone and the re-encoding baseline
    are timed on the same windows, each resumed from the ensemble's text before the window
    (a full baseline run takes many minutes: its step cost grows with the text). The
    baseline must choose the ensemble's very tokens; that is checked.
    """
    prompt = PROMPTS[0]
    ens_times, ens_ids = ensemble_token_times(ens, prompt, n)
    tick()
    texts = ens.main.vocab.texts
    points = sorted({x for x in (16, 32, 64, 128, 256, 512, 1024, 2048) if x < n} | {n})

    def ms_at(times: list[float], length: int) -> float:
        return (times[length - 1] - times[length - 1 - WINDOW]) * 1000 / WINDOW

    curve = []
    same = True
    for length in points:
        start = length - WINDOW - 1  # tokens before the timed window (+1: its first step)
        prefix = ens_ids[:start]
        text = b"".join(texts[t] or b"" for t in prefix).decode("utf-8", errors="replace")
        alone_ms = sum(
            ms_at(member_alone(m, [prompt + text], WINDOW + 1, warm_up=length == points[0]),
                  WINDOW + 1)
            for m in ens.members
        )  # fmt: skip
        base_ids, base_times = follow(
            ens, prompt, WINDOW + 1, reencode=True, min_new_tokens=n, prefix=prefix
        )
        same = same and base_ids == ens_ids[start:length]
        curve.append(
            {
                "new_tokens": length,
                "ensemble_ms": round(ms_at(ens_times, length), 2),
                "reencode_baseline_ms": round(ms_at(base_times, WINDOW + 1), 2),
                "sum_of_members_ms": round(alone_ms, 2),
            }
        )
    tick()
    speedups = {
        str(p["new_tokens"]): round(p["reencode_baseline_ms"] / p["ensemble_ms"], 2)
        for p in curve
        if p["new_tokens"] in (128, n)
    }
    return {
        "prompt": prompt,
        "window": WINDOW,
        "curve": curve,
        "speedup_over_reencode": speedups,
        "baseline_same_tokens_as_ensemble": same,
    }


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _tensor_mb(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def kv_cache_mb(member: Member, batch: int, positions: int) -> float:
    """Keys and values of every layer for `batch` rows of `positions` tokens."""
    cfg = member.model.config
    cfg = getattr(cfg, "text_config", cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_hidden_layers * heads * head_dim * member.dtype.itemsize
    return per_position * batch * positions / 2**20


def memory(ens: Ensemble, rss_before_load: float, largest: tuple[int, int]) -> dict:
    """Peak resident memory against what the ensemble must hold."""
    batch, positions = largest
    weights = {
        m.name: _tensor_mb(list(m.model.parameters()) + list(m.model.buffers()))
        for m in ens.members
    }
    caches = {m.name: kv_cache_mb(m, batch, positions) for m in ens.members}
    relative = sum(s.memory_bytes() for s in ens.fuser.spaces) / 2**20
    accounted = sum(weights.values()) + sum(caches.values()) + relative
    peak = _peak_rss_mb()
    return {
        "rss_before_load_mb": round(rss_before_load, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_above_start_mb": round(peak - rss_before_load, 1),
        "weights_mb": {k: round(v, 1) for k, v in weights.items()},
        "kv_cache_mb_largest_run": {k: round(v, 1) for k, v in caches.items()},
        "largest_run": {"batch_size": batch, "positions": positions},
        "relative_space_mb": round(relative, 1),
        "weights_caches_relative_mb": round(accounted, 1),
        "peak_above_start_over_accounted": round((peak - rss_before_load) / accounted, 3),
    }


def fidelity(
    ens: Ensemble, prompts: Sequence[str], n: int, leftout_mass: float, tick: Callable[[], None]
) -> dict:
    """Share of steps where the fast path's token equals the reference fusion's token."""
    reference = ReferenceFuser(ens.fuser, leftout_mass=leftout_mass)
    main = ens.main
    steps = agree = 0
    worst_leftout = [0.0] * len(ens.members)
    rows_used = [0] * len(ens.members)
    fast_leftout: list[list[float]] = [[] for _ in ens.members]
    k = ens.fusion.top_k
    disagreements = []
    for p, prompt in enumerate(prompts):

        def check(log: StepLog, p: int = p) -> None:
            nonlocal steps, agree
            ref = reference.fuse_row(log.logits)
            ref_token = int(ref.logits.argmax())
            steps += 1
            if ref_token == log.token:
                agree += 1
            else:
                disagreements.append(
                    {
                        "prompt": p,
                        "fast": main.tokenizer.decode([log.token]),
                        "reference": main.tokenizer.decode([ref_token]),
                    }
                )
            for i, (left, used) in enumerate(zip(ref.leftout_mass, ref.rows_used)):
                worst_leftout[i] = max(worst_leftout[i], left)
                rows_used[i] = max(rows_used[i], used)
                fast_leftout[i].append(_top_k_leftout(log.logits[i], ens.fuser.has_text[i], k))

        follow(ens, prompt, n, reencode=False, on_step=check)
        tick()
    return {
        "prompts": len(prompts),
        "steps": steps,
        "agreeing_steps": agree,
        "agreement": round(agree / steps, 4) if steps else None,
        "top_k": ens.fusion.top_k,
        "candidates": ens.fusion.candidates,
        "leftout_mass_bound": leftout_mass,
        "max_leftout_mass": {m.name: worst_leftout[i] for i, m in enumerate(ens.members)},
        "fast_path_leftout_mass": {
            m.name: {
                "mean": sum(fast_leftout[i]) / len(fast_leftout[i]) if fast_leftout[i] else None,
                "max": max(fast_leftout[i], default=None),
            }
            for i, m in enumerate(ens.members)
        },
        "max_non_anchor_rows_per_step": {m.name: rows_used[i] for i, m in enumerate(ens.members)},
        "disagreements": disagreements,
    }


def _top_k_leftout(logits: torch.Tensor, has_text: torch.Tensor, k: int) -> float:
    """Probability (of tokens with text) outside the fast path's top-k tokens."""
    probs = torch.where(has_text, torch.softmax(logits.float(), dim=-1), 0.0)
    top = probs[logits.topk(min(k, logits.numel())).indices].sum()
    return float(1 - top / probs.sum())


# --- plot and command -----------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed `deepen bench` arguments."""
    from tqdm.auto import tqdm

    from .cli import specs

    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1, got {args.new_tokens}.")
    if args.long_tokens < 2 * WINDOW:
        raise ConfigError(f"--long-tokens must be >= {2 * WINDOW}, got {args.long_tokens}.")
    if any(b < 1 for b in args.batch_sizes):
        raise ConfigError(f"--batch-sizes must all be >= 1, got {args.batch_sizes}.")
    if args.fidelity_prompts < 0 or args.fidelity_prompts > len(PROMPTS):
        raise ConfigError(
            f"--fidelity-prompts must be from 0 to {len(PROMPTS)}, got {args.fidelity_prompts}."
        )
    if not 0 <= args.leftout_mass < 1:
        raise ConfigError(f"--leftout-mass must be in [0, 1), got {args.leftout_mass}.")
    rss_start = rss_mb()
    ens = Ensemble(
        specs(args), main=args.main, eta=args.eta, steps=args.steps, min_anchors=args.min_anchors
    )
    if len(ens.members) < 2:
        raise ConfigError("deepen bench compares an ensemble with its members: give 2 or more.")
    n_ticks = len(args.batch_sizes) * (len(ens.members) + 1) + 3 + args.fidelity_prompts
    figures: dict[str, Any] = {
        "members": [m.name for m in ens.members],
        "main": ens.main.name,
        "fusion": {"eta": ens.fusion.eta, "steps": ens.fusion.steps, "top_k": ens.fusion.top_k},
        "device": str(ens.main.device),
        "dtype": str(ens.main.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": {m.name: round(m.load_seconds, 2) for m in ens.members},
        "align_seconds": round(ens.align_seconds, 2),
    }
    seconds: dict[str, float] = {}
    figures["section_seconds"] = seconds
    with tqdm(total=n_ticks, desc="deepen bench", file=sys.stderr) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        start = time.perf_counter()
        figures["speed"] = speed(ens, args.new_tokens, args.batch_sizes, tick)
        seconds["speed"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        figures["length"] = length_curve(ens, args.long_tokens, tick)
        seconds["length"] = round(time.perf_counter() - start, 1)
        prompt_tokens = max(len(m.tokenizer(p).input_ids) for m in ens.members for p in PROMPTS)
        largest = max(
            (max(args.batch_sizes), prompt_tokens + args.new_tokens),
            (1, prompt_tokens + args.long_tokens),
            key=lambda bp: bp[0] * bp[1],
        )
        # before the fidelity check, whose reference rows are not part of the ensemble
        figures["memory"] = memory(ens, rss_start, largest)
        start = time.perf_counter()
        figures["fidelity"] = fidelity(
            ens, PROMPTS[: args.fidelity_prompts], args.fidelity_tokens, args.leftout_mass, tick
        )
        seconds["fidelity"] = round(time.perf_counter() - start, 1)
    if args.plot:
        plot_bench(figures, args.plot)
        figures["plot"] = args.plot
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
        return 0
    _print_table(figures)
    return 0


def _print_table(f: dict) -> None:
    print(f"members {' + '.join(f['members'])} (main {f['main']}), {f['dtype']} on {f['device']}")
    print("\nms per decoding step (one token per row)")
    names = f["members"]
    head = "".join(f"{n[:18]:>20}" for n in names)
    print(f"{'batch':>5}{head}{'sum':>9}{'ensemble':>10}{'ratio':>7}{'fusion share':>14}")
    for r in f["speed"]["rows"]:
        alone = "".join(f"{r['members_alone_ms'][n]:>20.1f}" for n in names)
        print(
            f"{r['batch_size']:>5}{alone}{r['sum_of_members_ms']:>9.1f}{r['ensemble_ms']:>10.1f}"
            f"{r['ratio_ensemble_to_sum']:>7.2f}{r['fusion_only_share']:>14.1%}"
        )
    print("\nms per token after N new tokens (batch 1)")
    print(f"{'N':>6}{'ensemble':>10}{'re-encode':>11}{'sum alone':>11}")
    for p in f["length"]["curve"]:
        print(
            f"{p['new_tokens']:>6}{p['ensemble_ms']:>10.1f}{p['reencode_baseline_ms']:>11.1f}"
            f"{p['sum_of_members_ms']:>11.1f}"
        )
    print(f"speed-up over re-encoding: {f['length']['speedup_over_reencode']}")
    m = f["memory"]
    print(
        f"\npeak RSS {m['peak_rss_mb']:.0f} MiB ({m['peak_rss_above_start_mb']:.0f} above start); "
        f"weights + KV caches + relative space {m['weights_caches_relative_mb']:.0f} MiB"
    )
    fid = f["fidelity"]
    if fid["steps"]:
        print(
            f"fidelity: fast path = reference on {fid['agreeing_steps']}/{fid['steps']} steps "
            f"({fid['agreement']:.1%}); left-out mass <= {fid['leftout_mass_bound']}"
        )
    if "plot" in f:
        print(f"plot: {f['plot']}")
