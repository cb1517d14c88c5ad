"""Resident memory of a member's tokenizer, step by step (Linux /proc), each step in a fresh
process after the imports: what it keeps (RSS over the RSS before, once the freed heap is
handed back as `load_member` does) and its peak (VmHWM over the RSS before).

    python scripts/tokenizer_memory.py ~/.cache/deepen/models/gemma-3-270m-1.0.0-bfloat16

Steps: `rust` (the `tokenizers` library alone reading tokenizer.json), `rust-python`
(the same tokenizer with its BPE model built from Python objects, as members read it:
deepen_engine/members/tokenizer_file.py), `auto` (`AutoTokenizer.from_pretrained`),
`member` (`load_tokenizer`, as members load it) and `member+vocab` (that and the canonical
vocabulary). docs/benchmarks.md ("Loading: time and peak memory") quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from deepen_engine.commands.bench.proc_status import status_mb

STEPS = ("rust", "rust-python", "auto", "member", "member+vocab")


def measure(folder: str, step: str) -> dict[str, float]:
    """One step in this process: kept and peak MB over the RSS before it."""
    import tokenizers
    from transformers import AutoTokenizer

    from deepen_engine.alignment.vocabulary import CanonicalVocab
    from deepen_engine.heap import release_freed_heap
    from deepen_engine.members.tokenizer_file import load_tokenizer, read_backend

    release_freed_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = status_mb("VmRSS")
    kept: object
    if step == "rust":
        kept = tokenizers.Tokenizer.from_file(f"{folder}/tokenizer.json")
    elif step == "rust-python":
        kept = read_backend(f"{folder}/tokenizer.json")
    elif step == "auto":
        kept = AutoTokenizer.from_pretrained(folder)
    else:
        kept = load_tokenizer(folder)
        if step == "member+vocab":
            kept = (kept, CanonicalVocab.from_tokenizer(kept, len(kept)))  # type: ignore[arg-type]
    peak = status_mb("VmHWM") - before
    release_freed_heap()
    return {"kept_mb": round(status_mb("VmRSS") - before, 1), "peak_mb": round(peak, 1)}


def main() -> None:
    """Print each step's figures, each measured in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a model folder with tokenizer.json")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.step:
        print(json.dumps(measure(args.folder, args.step)))
        return
    print(f"{'step':<12}{'kept MB':>9}{'peak MB':>9}")
    for step in STEPS:
        command = [sys.executable, __file__, args.folder, "--step", step]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{step:<12}{row['kept_mb']:>9.1f}{row['peak_mb']:>9.1f}")


if __name__ == "__main__":
    main()
