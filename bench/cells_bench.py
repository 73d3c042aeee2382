"""What a cell costs, Parallax beside evcxr_jupyter 0.22 and ipyparallel 9.2 in one run, every
figure a whole cell as the client waits for it (execute_request to idle), medians of --runs.

- A trivial `let` and an expression cell, each new (a build) and the same cell again (Parallax
  loads it from its compiled-cell cache), in the notebook and with `%px` on 4 engines;
  evcxr_jupyter runs the same cells, ipyparallel `a = 1` and `%px a = 1` (Python interprets).
- `%pmap` of 1 000 000 u64 through a function already mapped, against ipyparallel's DirectView
  `map_sync`.
- Starting 4 engines until ready, with the standby engine a kernel warms while idle, against
  ipyparallel's `Cluster(n=4)`.
- The compiled-cell cache's hits over examples/quickstart.ipynb run twice (a kernel restart
  between), with a cache of its own.

Run by bench/peers.sh after peers_bench.py.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from peers_bench import IPP_SETUP, IPP_START, IPP_STOP, Kernel, ratio, stop_kernels

ROOT = Path(__file__).resolve().parent.parent
# Long enough for the standby engine to warm after the notebook's context is built.
IDLE_BEFORE_START_S = 20


class Counter:
    """Distinct names, so that every `new` cell is a new build: distinct across runs too, since
    the host's compiled-cell cache keeps what earlier runs built."""

    def __init__(self):
        self.n = time.time_ns() // 1000 % 10**12

    def next(self):
        self.n += 1
        return self.n


def new_and_again(kernel, runs, new_cell, again_cell, counter):
    """(median of new cells, median of the same cell again)."""
    kernel.cell(again_cell(0))
    new = statistics.median(kernel.cell(new_cell(counter.next()))[0] for _ in range(runs))
    again = kernel.timed(again_cell(0), runs)
    return new, again


def local_cells(kernel, runs, counter, prefix=""):
    kernel.cell(f"{prefix}let a0 = 1u64;")
    let = new_and_again(
        kernel, runs, lambda i: f"{prefix}let b{i} = {i}u64;", lambda _: f"{prefix}let b = 1u64;", counter
    )
    expr = new_and_again(
        kernel, runs, lambda i: f"{prefix}a0 + {i}", lambda _: f"{prefix}a0 + 1", counter
    )
    return let, expr


def quickstart_cells():
    notebook = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def cache_counts(kernel):
    _, text = kernel.cell("%cache")
    found = re.search(r"(\d+) hits and (\d+) builds", text)
    return int(found.group(1)), int(found.group(2))


def quickstart_hit_rate(kernels):
    """Hits and builds of the quickstart's second run, in a cache of its own."""
    cache = tempfile.mkdtemp(prefix="parallax-bench-cells-")
    os.environ["PARALLAX_CELL_CACHE"] = cache
    try:
        counts = []
        for _ in range(2):
            kernel = Kernel("parallax", kernels)
            for code in quickstart_cells():
                kernel.cell(code)
            counts.append(cache_counts(kernel))
            kernel.stop()
        (hits1, builds1), (hits2, builds2) = counts
        return (hits1, builds1), (hits2 - hits1, builds2 - builds1)
    finally:
        del os.environ["PARALLAX_CELL_CACHE"]
        shutil.rmtree(cache, ignore_errors=True)


def main():
    kernels = []
    try:
        measure(kernels)
    finally:
        stop_kernels(kernels)


def measure(kernels):
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    # peers.sh passes peers_bench.py's options too (--engines): not used here.
    args, _ = parser.parse_known_args()
    counter = Counter()

    px = Kernel("parallax", kernels)
    px.cell("1")
    time.sleep(IDLE_BEFORE_START_S)
    px_local = local_cells(px, args.runs, counter)
    evcxr = Kernel("bench-evcxr", kernels)
    evcxr_local = local_cells(evcxr, args.runs, counter)
    evcxr.stop()
    ipy = Kernel("bench-ipython", kernels)
    ipy.cell(IPP_SETUP)
    ipy_local = ipy.timed("a = 1", max(args.runs, 20), warm=2)

    start_px = px.cell("%cluster start -n 4")[0]
    start_ipy = ipy.cell(IPP_START.format(n=4))[0]
    px_4 = local_cells(px, args.runs, counter, prefix="%px ")
    ipy_4 = ipy.timed("%px a=1", max(args.runs, 20), warm=2)

    px.cell("%%px\nfn ident(x: u64) -> u64 { x }")
    px.cell("%pmap -o out ident 0..1_000_000u64")
    pmap_again = px.timed("%pmap -o out ident 0..1_000_000u64", args.runs, warm=0)
    ipy_map = ipy.timed("out = dv.map_sync(ident, range(1_000_000))", args.runs)
    px.cell("%cluster stop")
    ipy.cell(IPP_STOP)
    px.stop()
    ipy.stop()
    first, second = quickstart_hit_rate(kernels)

    print(f"\nA cell's cost, medians of {args.runs} runs (20 for ipyparallel); whole cells as a client waits for them.\n")
    print("| cell | Parallax | evcxr_jupyter | ipyparallel | Parallax / evcxr | Parallax / ipyparallel |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("`let`, new", px_local[0][0], evcxr_local[0][0], ipy_local),
        ("`let`, the same again", px_local[0][1], evcxr_local[0][1], ipy_local),
        ("expression, new", px_local[1][0], evcxr_local[1][0], ipy_local),
        ("expression, the same again", px_local[1][1], evcxr_local[1][1], ipy_local),
        ("`%px let` on 4 engines, new", px_4[0][0], None, ipy_4),
        ("`%px let` on 4 engines, the same again", px_4[0][1], None, ipy_4),
        ("`%px` expression on 4 engines, new", px_4[1][0], None, ipy_4),
        ("`%px` expression on 4 engines, the same again", px_4[1][1], None, ipy_4),
    ]
    for name, ours, evcxr_s, ipy_s in rows:
        evcxr_text = f"{evcxr_s * 1000:.0f} ms" if evcxr_s else "-"
        evcxr_ratio = ratio(ours, evcxr_s) if evcxr_s else "-"
        print(
            f"| {name} | {ours * 1000:.0f} ms | {evcxr_text} | {ipy_s * 1000:.1f} ms | "
            f"{evcxr_ratio} | {ratio(ours, ipy_s)} |"
        )
    print(
        f"\n`%pmap` of 1 000 000 u64 through a function already mapped, 4 engines: Parallax "
        f"{pmap_again:.3f} s, ipyparallel `dv.map_sync` {ipy_map:.3f} s (ratio {ratio(pmap_again, ipy_map)})"
    )
    print(
        f"\nStart 4 engines until ready, {IDLE_BEFORE_START_S} s after the kernel started (the standby "
        f"engine warm): Parallax {start_px:.2f} s, ipyparallel {start_ipy:.2f} s (ratio {ratio(start_px, start_ipy)})"
    )
    print(
        f"\nCompiled-cell cache over examples/quickstart.ipynb run twice (a new kernel each time, a "
        f"cache of its own): first run {first[0]} hits, {first[1]} builds; second run {second[0]} hits, "
        f"{second[1]} builds ({100 * second[0] / max(1, sum(second)):.0f}% hits)"
    )


if __name__ == "__main__":
    main()
