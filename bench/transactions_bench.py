"""What running each cell as a transaction costs (issue 18): the notebook's store forks for every
compiled cell, the fork runs it and takes over when it ends. The fork copies the holder's page
tables, so its cost grows with the heap. Measured: a trivial cell run again (`heap.len()`, run
from memory, so that the figure is the store's work and not a build) while the notebook holds
nothing, 10 MiB, 1 GiB and 8 GiB, every page of it written; and a cell that rewrites 1 GiB (every
page it changes is copied once, copy on write). Whole cells as a client waits for them
(execute_request to idle), medians of --runs.

Run: bash -c 'source bench/peers_env.sh && .venv/bin/python bench/transactions_bench.py'
"""

import argparse
import statistics

from peers_bench import Kernel, stop_kernels

HEAPS = [("nothing", 0), ("10 MiB", 10 << 20), ("1 GiB", 1 << 30), ("8 GiB", 8 << 30)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args, _ = parser.parse_known_args()
    kernels = []
    try:
        kernel = Kernel("parallax", kernels)
        rows = []
        for label, size in HEAPS:
            # Every byte written, so that every page is resident.
            kernel.cell(f"let heap = vec![1u8; {size}];")
            kernel.cell("heap.len()")
            kernel.cell("heap.len()")
            rows.append((label, kernel.timed("heap.len()", args.runs, warm=0)))
        rewrite = "heap.iter_mut().for_each(|b| *b = b.wrapping_add(1));"
        kernel.cell(f"let mut heap = vec![1u8; {1 << 30}];")
        rewrites = [kernel.cell(rewrite)[0] for _ in range(args.runs)]
    finally:
        stop_kernels(kernels)
    base = rows[0][1]
    print(f"\nA trivial cell run again, the notebook holding a heap; medians of {args.runs}.\n")
    print("| heap | cell | over an empty heap |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1000:.1f} ms | {(seconds - base) * 1000:+.1f} ms |")
    print(
        f"\nA cell that rewrites 1 GiB (each page copied once while it runs): "
        f"{statistics.median(rewrites):.3f} s"
    )


if __name__ == "__main__":
    main()
