"""Time the kernels that can sum DeePEn's relative rows straight from the row cache
(`RelativeSpace.weighted_sum`): a sparse CSR (batch, slots) x (slots, anchors) product, and
`embedding_bag` with per-sample weights (one bag per batch row). Interleaved (A, B, A, B...)
and repeated; prints the median milliseconds of each and their ratio.

    python scripts/fusion_kernels.py                 # 46,145 anchors, as the default pair
    python scripts/fusion_kernels.py --threads 1 --repeat 9

Random rows of the default pair's width stand in for cached rows: the kernels' cost depends
on the shapes and the number of rows read, not on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _csr(starts: torch.Tensor, slots: torch.Tensor, w: torch.Tensor, buf: torch.Tensor):
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(starts, slots, w, size=(starts.numel() - 1, len(buf)))
        return sparse @ buf


def _bag(starts: torch.Tensor, slots: torch.Tensor, w: torch.Tensor, buf: torch.Tensor):
    return torch.nn.functional.embedding_bag(
        slots, buf, starts[:-1], mode="sum", per_sample_weights=w
    )


def main() -> None:
    """Time both kernels at each batch size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", type=int, default=46145)
    parser.add_argument("--cache-rows", type=int, default=4096)
    parser.add_argument("--per-row", type=int, default=64, help="rows summed per batch row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    buf = torch.rand(args.cache_rows, args.anchors, generator=g)
    print(f"torch threads {torch.get_num_threads()}, {args.anchors} anchors, "
          f"{args.cache_rows} cached rows, {args.per_row} rows per batch row")  # fmt: skip
    print(f"{'batch':>5} {'csr ms':>8} {'bag ms':>8} {'bag/csr':>8} {'max |diff|':>11}")
    for batch in args.batch_sizes:
        n = batch * args.per_row
        slots = torch.randint(0, args.cache_rows, (n,), generator=g)
        w = torch.rand(n, generator=g)
        starts = torch.arange(0, n + 1, args.per_row)
        diff = (_csr(starts, slots, w, buf) - _bag(starts, slots, w, buf)).abs().max().item()
        times: dict[str, list[float]] = {"csr": [], "bag": []}
        for _ in range(args.repeat):
            for name, kernel in (("csr", _csr), ("bag", _bag)):
                start = time.perf_counter()
                for _ in range(5):
                    kernel(starts, slots, w, buf)
                times[name].append((time.perf_counter() - start) / 5 * 1000)
        csr, bag = statistics.median(times["csr"]), statistics.median(times["bag"])
        ratios = statistics.median(b / c for b, c in zip(times["bag"], times["csr"]))
        print(f"{batch:>5} {csr:>8.2f} {bag:>8.2f} {ratios:>8.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
