"""Why the scheduler frees idle OpenMP pools (deepen_engine/openmp.py): ms per decoding
step of the default pair, decoded on the main thread, on a second thread while the main
thread's OpenMP pool is alive, and on a second thread after the main thread freed it.

    HF_HUB_OFFLINE=1 python scripts/openmp_pools.py --rounds 3 --batch-sizes 1 8

Each round measures the three cases in turn (interleaved); medians of the rounds. Standard
steps (speculate=0), 16 new tokens, the bench's prompts, Gemma-3 leading.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from deepen_engine import Ensemble, GenerationConfig
from deepen_engine.commands.bench.sections import PROMPTS
from deepen_engine.decoding.decode import decode
from deepen_engine.openmp import release_thread_pool


def _step_ms(ens: Ensemble, batch: int, tokens: int) -> float:
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, speculate=0)
    prompts = [[(PROMPTS[i % len(PROMPTS)], True)] * len(ens.members) for i in range(batch)]
    start = time.perf_counter()
    for _ in decode(ens.members, ens.fuser, prompts, config):
        pass
    return (time.perf_counter() - start) * 1000 / tokens


def _on_a_thread(ens: Ensemble, batch: int, tokens: int) -> float:
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(_step_ms(ens, batch, tokens)))
    worker.start()
    worker.join()  # the thread ends, and its pool with it
    return out[0]


def main() -> None:
    """Measure the three cases, interleaved, for each batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    ens = Ensemble(main=0)
    _step_ms(ens, max(args.batch_sizes), 4)  # warm-up: caches, and the main thread's pool
    for batch in args.batch_sizes:
        cases: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            cases.setdefault("main thread", []).append(_step_ms(ens, batch, args.tokens))
            cases.setdefault("second thread, main pool alive", []).append(
                _on_a_thread(ens, batch, args.tokens)
            )
            _step_ms(ens, 1, 1)  # the main thread's pool again, then freed
            release_thread_pool()
            cases.setdefault("second thread, main pool freed", []).append(
                _on_a_thread(ens, batch, args.tokens)
            )
        figures = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in cases.items())
        print(f"batch {batch}: ms per step: {figures}", flush=True)


if __name__ == "__main__":
    main()
