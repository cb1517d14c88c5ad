"""`deepen bench --load`: what loading each member costs: seconds, and peak resident memory
against the size of its weights in the dtype it asks for.

    deepen bench --load --dtype bfloat16 --json

Each member loads in a fresh Python process (`python -m deepen_engine.commands.bench.load
SPEC_JSON`), so one member's freed memory cannot hide another's peak, and the figures do
not include this process's own. In that process, after the imports:

1. the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`, Linux) and the resident
   memory read (`rss_before_mb`: Python, torch and transformers);
2. the member loads as an ensemble loads it (`load_member`: tokenizer, weights, canonical
   vocabulary); `load_seconds` is that wall time;
3. `load_peak_mb` is the peak RSS since the reset, right after the load;
4. one forward pass over a short prompt (memory-mapped weights count in RSS only once they
   are read), then `peak_mb`, the peak RSS since the reset; `added_peak_mb = peak_mb -
   rss_before_mb` is what loading and running the member needed at its worst, and
   `peak_ratio` is that over `weights_mb` (parameters x bytes per element of the loaded
   dtype, tied weights counted once).

The load also builds the tokenizer and the canonical vocabulary, which are not weights: a
second fresh process loads only those, as `load_member` does (freed heap handed back at
the end), and reports `tokenizer_mb`, the resident memory they keep, and
`tokenizer_peak_mb`, their added peak while loading (a tokenizer's parse allocates far
more than it keeps; the weights, read later, stack on what it keeps).
`weights_peak_ratio = (added_peak_mb - tokenizer_mb) / weights_mb` is the weights' own
share.

A GGUF member is converted once per dtype before it is measured (in this process), so the
figures are those of every later load, not of the first conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from ...heap import release_freed_heap
from ...members import MemberSpec, load_local_member
from ...members.loading import _resolve
from ...members.tokenizer_file import load_tokenizer
from .proc_status import status_mb


def measure_here(spec: MemberSpec) -> dict[str, Any]:
    """Load `spec` in this process and measure it (steps 1-3 of the module docstring)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = status_mb("VmRSS")
    start = time.perf_counter()
    member = load_local_member(spec)
    seconds = time.perf_counter() - start
    load_peak = status_mb("VmHWM")
    # 4. one short forward pass: memory-mapped weights count once they are read, so the
    # peak after it is what running the member holds, not only what loading touched
    ids = member.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        member.model(input_ids=ids.to(member.device))
    peak = status_mb("VmHWM")
    seen: set[int] = set()
    weights = 0
    for p in member.model.parameters():  # tied embeddings and head once
        if p.data_ptr() in seen and p.device.type != "meta":
            continue
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
    weights_mb = weights / 2**20
    before, load_peak, peak = round(before, 1), round(load_peak, 1), round(peak, 1)
    return {
        "member": member.name,
        "dtype": str(member.dtype).removeprefix("torch."),
        "device": str(member.device),
        "device_map": member.device_map,
        "parameters": member.num_parameters,
        "weights_mb": round(weights_mb, 1),
        "load_seconds": round(seconds, 2),
        "rss_before_mb": round(before, 1),
        "load_peak_mb": round(load_peak, 1),
        "peak_mb": round(peak, 1),
        "added_peak_mb": round(peak - before, 1),
        "peak_ratio": round((peak - before) / weights_mb, 3),
    }


def measure_tokenizer_here(spec: MemberSpec) -> dict[str, Any]:
    """The added peak RSS of loading only the member's tokenizer and canonical vocabulary."""
    from ...alignment.vocabulary import CanonicalVocab

    where = _resolve(str(spec.source), spec.dtype)[2]
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = status_mb("VmRSS")
    tokenizer = load_tokenizer(where)  # as load_member reads it
    CanonicalVocab.from_tokenizer(tokenizer, len(tokenizer))
    release_freed_heap()  # as load_member does once the member is built
    return {
        "tokenizer_mb": round(status_mb("VmRSS") - before, 1),
        "tokenizer_peak_mb": round(status_mb("VmHWM") - before, 1),
    }


def load_costs(specs: list[MemberSpec], repeat: int = 1) -> list[dict[str, Any]]:
    """Each member's load figures, each load in a fresh process; with `repeat` > 1 the
    loads are interleaved (member 1, member 2, member 1, ...) and the median run of each
    member (by load time) is kept, with every run's seconds and peak ratio.
    """
    for spec in specs:  # convert GGUF members once, outside the measured processes
        if isinstance(spec.source, str):
            _resolve(spec.source, spec.dtype)
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for _ in range(repeat):
        for i, spec in enumerate(specs):
            runs[i].append(_measure_in_child(spec))
    out = []
    for spec, member_runs in zip(specs, runs):
        ordered = sorted(member_runs, key=lambda r: r["load_seconds"])
        median = dict(ordered[len(ordered) // 2])
        if isinstance(spec.source, str):
            median.update(_measure_in_child(spec, "tokenizer"))
            weights_added = median["added_peak_mb"] - median["tokenizer_mb"]
            median["weights_peak_ratio"] = round(weights_added / median["weights_mb"], 3)
        median["runs_load_seconds"] = [r["load_seconds"] for r in member_runs]
        median["runs_peak_ratio"] = [r["peak_ratio"] for r in member_runs]
        out.append(median)
    return out


def _measure_in_child(spec: MemberSpec, what: str = "member") -> dict[str, Any]:
    settings = spec.model_dump(exclude_unset=True)
    settings["source"] = str(spec.source)
    module = "deepen_engine.commands.bench.load"
    command = [sys.executable, "-m", module, json.dumps(settings), what]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(
            f"measuring the load of {settings['source']!r} failed:\n{done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def load_table(rows: list[dict[str, Any]]) -> str:
    """The figures as a text table."""
    w = max([24, *(len(r["member"]) + 2 for r in rows)])
    lines = [
        f"{'member':<{w}}{'dtype':<10}{'weights MB':>11}{'load s':>8}{'before MB':>10}"
        f"{'peak MB':>9}{'added MB':>9}{'ratio':>7}{'tok MB':>8}{'tok peak':>9}{'w ratio':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['member']:<{w}}{r['dtype']:<10}{r['weights_mb']:>11.1f}{r['load_seconds']:>8.2f}"
            f"{r['rss_before_mb']:>10.1f}{r['peak_mb']:>9.1f}{r['added_peak_mb']:>9.1f}"
            f"{r['peak_ratio']:>7.3f}{r.get('tokenizer_mb', 0):>8.1f}"
            f"{r.get('tokenizer_peak_mb', 0):>9.1f}"
            f"{r.get('weights_peak_ratio', r['peak_ratio']):>8.3f}"
        )
    lines.append("ratio: (peak RSS - RSS before the load) / weights in the loaded dtype")
    lines.append(
        "tok MB: what the tokenizer and vocabulary keep (tok peak: their peak while loading); "
        "w ratio: ratio without tok MB"
    )
    return "\n".join(lines)


def _import_code(spec: MemberSpec) -> None:
    """Import the model's code before the baseline: the figures are the load's data, not
    Python modules that any process running the member imports once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if isinstance(spec.source, str):
        where = _resolve(spec.source, spec.dtype)[2]
        config = AutoConfig.from_pretrained(where)
        AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module


if __name__ == "__main__":
    spec = MemberSpec(**json.loads(sys.argv[1]))
    _import_code(spec)
    measure = measure_tokenizer_here if sys.argv[2:] == ["tokenizer"] else measure_here
    print(json.dumps(measure(spec)))
