"""Where a member's load and first forward put their resident memory (Linux /proc), in one
fresh process, as `deepen bench --load` measures it: after the same imports, the member is
loaded (`load_local_member`) and run once on the bench's prompt, and each step reports the
RSS over the RSS before, split into anonymous memory (the heap: tokenizer, vocabulary,
Python objects, activations) and file-backed pages (the memory-mapped weights, the code of
the libraries run), with the files whose resident pages grew most.

    python scripts/load_memory.py gemma-3-270m --dtype bfloat16

docs/benchmarks.md ("Loading: time and peak memory") quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from typing import Any

STEPS = ("tokenizer", "model", "member", "forward")


def _mapped_files() -> dict[str, float]:
    """Resident MB of each mapped file ('[anon]' for the rest), from /proc/self/smaps."""
    out: dict[str, float] = defaultdict(float)
    name = "[anon]"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                name = fields[5] if len(fields) > 5 and fields[5].startswith("/") else "[anon]"
            elif fields and fields[0] == "Rss:":
                out[name] += int(fields[1]) / 1024
    return out


def measure(source: str, dtype: str) -> dict[str, object]:
    """The steps in this process (the child's side)."""
    import torch

    from deepen_engine.commands.bench.load import _import_code
    from deepen_engine.commands.bench.proc_status import status_mb
    from deepen_engine.members import MemberSpec, load_local_member, loading

    spec = MemberSpec(source=source, dtype=dtype)
    _import_code(spec)
    loading.release_freed_heap()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    base = {f: status_mb(f) for f in ("VmRSS", "RssAnon", "RssFile")}
    files = _mapped_files()
    steps: list[dict[str, object]] = []

    def step(name: str) -> None:
        now = _mapped_files()
        grown = {f: round(now[f] - files[f], 1) for f in now if now[f] - files[f] >= 0.5}
        steps.append(
            {
                "step": name,
                "rss_mb": round(status_mb("VmRSS") - base["VmRSS"], 1),
                "peak_mb": round(status_mb("VmHWM") - base["VmRSS"], 1),
                "anon_mb": round(status_mb("RssAnon") - base["RssAnon"], 1),
                "file_mb": round(status_mb("RssFile") - base["RssFile"], 1),
                "files_mb": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:4]),
            }
        )

    # each step reported as load_member reaches it: the module's own functions wrapped
    load_tokenizer, build_model = loading.load_tokenizer, loading._load_folder_or_hub  # type: ignore[attr-defined]

    def tokenizer_then_step(*args: Any) -> Any:
        tokenizer = load_tokenizer(*args)
        loading.release_freed_heap()
        step("tokenizer")
        return tokenizer

    def model_then_step(*args: Any, **kwargs: Any) -> Any:
        pair = build_model(*args, **kwargs)
        step("model")
        return pair

    setattr(loading, "load_tokenizer", tokenizer_then_step)  # noqa: B010
    setattr(loading, "_load_folder_or_hub", model_then_step)  # noqa: B010
    member = load_local_member(spec)
    step("member")  # and the canonical vocabulary and checks, freed heap handed back
    ids = member.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        member.model(input_ids=ids.to(member.device))
    step("forward")
    return {"member": member.name, "steps": steps}


def main() -> None:
    """Print the steps of the member's load, measured in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a member: an embedded name, a .gguf file or a folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.source, args.dtype)))
        return
    command = [sys.executable, __file__, args.source, "--dtype", args.dtype, "--child"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{result['member']} ({args.dtype}), MB over the RSS before the load:")
    print(f"{'after':<11}{'RSS':>8}{'peak':>8}{'anon':>8}{'file':>8}  files grown most")
    for s in result["steps"]:
        grown = ", ".join(f"{f.rsplit('/', 1)[-1]} {mb}" for f, mb in s["files_mb"].items())
        print(
            f"{s['step']:<11}{s['rss_mb']:>8.1f}{s['peak_mb']:>8.1f}{s['anon_mb']:>8.1f}"
            f"{s['file_mb']:>8.1f}  {grown}"
        )


if __name__ == "__main__":
    main()
