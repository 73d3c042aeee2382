"""Parallax side by side with ipyparallel and evcxr_jupyter, the same workloads in one run, every
figure timed the same way: from the client's execute_request to the idle status that ends the
cell (what a notebook user waits), through jupyter_client, medians of --runs.

- Broadcast of a trivial cell with 1, 2, 4, 8 engines: Parallax `%px let a = 1;`, ipyparallel
  `%px a=1` through a real ipykernel, evcxr_jupyter `let a = 1;` (one process, no engines).
- Time to start 4 engines until all are ready.
- A map with 4 engines: identity over 1 000 000 items and a CPU-heavy function (a 10 ms busy loop
  an item, 800 items): Parallax `%pmap` against ipyparallel's load-balanced `map` (chunked, and at
  chunksize 1 over fewer items) and DirectView `map_sync`.
- push, scatter, pull and gather of 100 MiB and 1 GiB with 4 engines (a Vec<f64> / a numpy
  float64 array), each against the same cell with 8 bytes: whole cells and marginal rates.
- Control round trip without compiling: Parallax `%cluster ping` against ipyparallel's
  `apply_sync` of a no-op function and `execute('pass')` on every engine (timed in the kernel).

Run by bench/peers.sh, which installs the peers; needs the kernelspecs `parallax`,
`bench-ipython` and `bench-evcxr` on JUPYTER_PATH.
"""

import argparse
import json
import re
import statistics
import time

from jupyter_client import KernelManager

MIB = 1 << 20


class Kernel:
    def __init__(self, name, kernels):
        self.name = name
        kernels.append(self)
        self.km = KernelManager(kernel_name=name)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=300)

    def cell(self, code, timeout=1800):
        """(seconds, text printed) of one cell; fails the benchmark if the cell fails."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        text = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("display_data", "execute_result"):
                text.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                raise SystemExit(f"{code!r} failed: {content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                elapsed = time.perf_counter() - t0
                break
        reply = self.kc.get_shell_msg(timeout=timeout)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"{code!r} failed: {reply['content']}")
        return elapsed, "".join(text)

    def timed(self, code, runs, warm=1):
        for _ in range(warm):
            self.cell(code)
        return statistics.median(self.cell(code)[0] for _ in range(runs))

    def figure(self, code):
        """A figure the kernel itself measures, printed as `BENCH <json>`."""
        _, text = self.cell(code)
        found = re.search(r"BENCH (.*)", text)
        if not found:
            raise SystemExit(f"no figure from {code!r}: {text!r}")
        return json.loads(found.group(1))

    def stop(self):
        if self.km.is_alive():
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)


IPP_SETUP = """
import ipyparallel as ipp, time, statistics, json
import numpy
def ident(x):
    return x
def heavy(x):
    import time
    t = time.perf_counter()
    a = x
    while time.perf_counter() - t < 0.010:
        a = (a * 6364136223846793005 + 1) & 0xFFFFFFFFFFFFFFFF
    return a
def noop():
    pass
"""

IPP_START = """
cluster = ipp.Cluster(n={n}, log_level=40)
rc = cluster.start_and_connect_sync()
rc.wait_for_engines({n}, timeout=300)
dv = rc[:]
dv.activate()
lview = rc.load_balanced_view()
"""

IPP_STOP = "rc.close(); cluster.stop_cluster_sync(); del cluster"

HEAVY_RS = (
    "fn heavy(x: u64) -> u64 { let t = std::time::Instant::now(); let mut a = x; "
    "while t.elapsed() < std::time::Duration::from_millis(10) "
    "{ a = a.wrapping_mul(6364136223846793005).wrapping_add(1); } a }"
)


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}"


# Each move: (name, Parallax's cell, ipyparallel's cell, how many times the value's size it moves).
MOVES = [
    ("push", "%push {v}_e = {v}", "dv.push({{'{v}_e': {v}}}, block=True)", 4),
    ("scatter", "%scatter {v}_p = {v}", "dv.scatter('{v}_p', {v}, block=True)", 1),
    ("pull (the scattered parts)", "%pull {v}_p -o {v}_pulled", "{v}_pulled = dv.pull('{v}_p', block=True)", 1),
    ("gather (the scattered parts)", "%gather {v}_p -o {v}_gathered", "{v}_gathered = dv.gather('{v}_p', block=True)", 1),
]
SIZES = [("100 MiB", 100 * MIB), ("1 GiB", 1024 * MIB)]


def measure_moves(px, ipy, runs):
    """Whole cells moving a vector of f64 (a numpy float64 array) and the same cells moving
    8 bytes, on 4 engines: their difference is the cost of the bytes, without the fixed cost
    of a cell (for Parallax, compiling its generated cells)."""
    px.cell("let tiny: Vec<f64> = vec![7.0; 1];")
    ipy.cell("tiny = numpy.full(1, 7.0)")
    figures = {}
    for label, size in SIZES:
        n = size // 8
        px.cell(f"let big: Vec<f64> = (0..{n}).map(|i| i as f64).collect();")
        ipy.cell(f"big = numpy.arange({n}, dtype=numpy.float64)")
        # Fewer runs of the big value: ipyparallel takes several seconds a cell.
        big_runs = runs if size <= 100 * MIB else max(1, min(runs, 3))
        for name, ours, theirs, times in MOVES:
            row = {}
            for kernel, cell in (("parallax", ours), ("ipyparallel", theirs)):
                k = px if kernel == "parallax" else ipy
                small = k.timed(cell.format(v="tiny"), big_runs)
                whole = k.timed(cell.format(v="big"), big_runs)
                row[kernel] = (whole, small)
            figures[(label, name)] = (row, size * times)
            # Both pools share 23 GiB: what a move left is let go before the next one.
            drop_results(px, ipy, name)
        px.cell("%px drop(big_p);")
        ipy.cell("dv.execute('del big_p', block=True)")
    return figures


def drop_results(px, ipy, name):
    if name == "push":
        px.cell("%px drop(big_e);")
        ipy.cell("dv.execute('del big_e', block=True)")
    elif name.startswith("pull"):
        px.cell("drop(big_pulled);")
        ipy.cell("del big_pulled")
    elif name.startswith("gather"):
        px.cell("drop(big_gathered);")
        ipy.cell("del big_gathered")


def print_moves(figures):
    print("\nData movement with 4 engines, a Vec<f64> (numpy float64): whole cell, the same cell with 8 "
          "bytes, and the marginal rate (bytes moved over the difference; a push moves 4 copies):\n")
    print("| value | move | Parallax cell (8 B cell) | Parallax marginal | ipyparallel cell (8 B cell) | "
          "ipyparallel marginal | whole cell ratio |")
    print("|---|---|---|---|---|---|---|")
    for (label, name), (row, moved) in figures.items():
        cells = []
        for kernel in ("parallax", "ipyparallel"):
            whole, small = row[kernel]
            extra = whole - small
            rate = f"{moved / MIB / extra:,.0f} MiB/s" if extra > 0 else "-"
            cells += [f"{whole:.2f} s ({small:.2f} s)", rate]
        ratio_text = ratio(row["parallax"][0], row["ipyparallel"][0])
        print(f"| {label} | {name} | {' | '.join(cells)} | {ratio_text} |")


def stop_kernels(kernels):
    """Stops every kernel of a run, also a failed one: ipyparallel's cluster first, since its
    processes outlive their kernel."""
    for kernel in kernels:
        try:
            if kernel.name == "bench-ipython":
                kernel.cell("'cluster' in dir() and cluster.stop_cluster_sync()", timeout=60)
            kernel.stop()
        except Exception as error:  # noqa: BLE001 - best effort at the end of a run
            print(f"cleaning up {kernel.name}: {error}")


def main():
    kernels = []
    try:
        measure_all(kernels)
    finally:
        stop_kernels(kernels)


def measure_all(kernels):
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engines", default="1,2,4,8")
    args = parser.parse_args()
    counts = [int(n) for n in args.engines.split(",")]

    px = Kernel("parallax", kernels)
    ipy = Kernel("bench-ipython", kernels)
    ipy.cell(IPP_SETUP)
    evcxr = Kernel("bench-evcxr", kernels)
    evcxr_cell = evcxr.timed("let a = 1;", args.runs, warm=2)
    evcxr.stop()

    # Broadcast of a trivial cell.
    latency = {}
    starts = {}
    for n in counts:
        starts[("parallax", n)] = px.cell(f"%cluster start -n {n}")[0]
        starts[("ipyparallel", n)] = ipy.cell(IPP_START.format(n=n))[0]
        latency[("parallax", n)] = px.timed("%px let a = 1;", args.runs, warm=2)
        latency[("ipyparallel", n)] = ipy.timed("%px a=1", max(args.runs, 20), warm=2)
        px.cell("%cluster stop")
        ipy.cell(IPP_STOP)
    # The rest runs on 4 engines; their start is timed here if the loop did not.
    start_px = px.cell("%cluster start -n 4")[0]
    start_ipy = ipy.cell(IPP_START.format(n=4))[0]
    starts.setdefault(("parallax", 4), start_px)
    starts.setdefault(("ipyparallel", 4), start_ipy)

    # Maps, 4 engines.
    px.cell(f"%%px --local\nfn ident(x: u64) -> u64 {{ x }}\n{HEAVY_RS}")
    px.cell("%pmap -o warm ident 0..10u64")  # builds the data crate in every context
    map_runs = [
        ("Parallax `%pmap ident`", 1_000_000, "%pmap -o out ident 0..1_000_000u64", px),
        ("Parallax `%pmap heavy`", 800, "%pmap -o out heavy 0..800u64", px),
        ("ipyparallel `lview.map_sync(ident)`, chunksize 10 000", 1_000_000,
         "out = lview.map_sync(ident, range(1_000_000), chunksize=10_000)", ipy),
        ("ipyparallel `lview.map_sync(ident)`, chunksize 1", 2_000, "out = lview.map_sync(ident, range(2_000))", ipy),
        ("ipyparallel `dv.map_sync(ident)`", 1_000_000, "out = dv.map_sync(ident, range(1_000_000))", ipy),
        ("ipyparallel `lview.map_sync(heavy)`, chunksize 1", 800, "out = lview.map_sync(heavy, range(800))", ipy),
        ("ipyparallel `lview.map_sync(heavy)`, chunksize 20", 800,
         "out = lview.map_sync(heavy, range(800), chunksize=20)", ipy),
        ("ipyparallel `dv.map_sync(heavy)`", 800, "out = dv.map_sync(heavy, range(800))", ipy),
    ]
    maps = [(name, items, kernel.timed(code, args.runs)) for name, items, code, kernel in map_runs]

    # Data movement, 4 engines, 100 MiB and 1 GiB.
    moves = measure_moves(px, ipy, args.runs)

    # Control round trip, 4 engines, no compiling.
    _, text = px.cell("%cluster ping -n 200")
    ping = float(re.search(r"median ([\d.]+) ms", text).group(1))
    ipp_apply = ipy.figure(
        "ts = []\nfor _ in range(200):\n    t = time.perf_counter(); dv.apply_sync(noop); ts.append(time.perf_counter() - t)\n"
        "print('BENCH', json.dumps(statistics.median(ts) * 1000))"
    )
    ipp_execute = ipy.figure(
        "ts = []\nfor _ in range(200):\n    t = time.perf_counter(); dv.execute('pass', block=True); ts.append(time.perf_counter() - t)\n"
        "print('BENCH', json.dumps(statistics.median(ts) * 1000))"
    )
    px.cell("%cluster stop")
    ipy.cell(IPP_STOP)

    print(f"\nMedians of {args.runs} runs (20 for ipyparallel's %px); whole cells as a client waits for them.\n")
    print("Broadcast of a trivial cell (Parallax `%px let a = 1;`, ipyparallel `%px a=1`, evcxr `let a = 1;`):\n")
    print("| engines | Parallax | ipyparallel | evcxr_jupyter | Parallax / ipyparallel | Parallax / evcxr | Parallax / its 1 engine |")
    print("|---|---|---|---|---|---|---|")
    one = latency.get(("parallax", 1))
    for n in counts:
        ours, theirs = latency[("parallax", n)], latency[("ipyparallel", n)]
        print(
            f"| {n} | {ours * 1000:.0f} ms | {theirs * 1000:.1f} ms | {evcxr_cell * 1000:.0f} ms | "
            f"{ratio(ours, theirs)} | {ratio(ours, evcxr_cell)} | {ratio(ours, one) if one else '-'} |"
        )
    ours, theirs = starts[("parallax", 4)], starts[("ipyparallel", 4)]
    print(f"\nStart 4 engines until ready: Parallax {ours:.2f} s, ipyparallel {theirs:.2f} s (ratio {ratio(ours, theirs)})")
    print("\nMaps on 4 engines (whole cell):\n")
    print("| map | items | time | items/s |")
    print("|---|---|---|---|")
    for name, items, seconds in maps:
        print(f"| {name} | {items:,} | {seconds:.3f} s | {items / seconds:,.0f} |")
    print_moves(moves)
    print(
        f"\nControl round trip to 4 engines, no compiling: Parallax `%cluster ping` {ping:.3f} ms; "
        f"ipyparallel apply_sync(noop) {ipp_apply:.2f} ms, execute('pass') {ipp_execute:.2f} ms "
        f"(ratio to apply_sync {ping / ipp_apply:.3f})"
    )


if __name__ == "__main__":
    main()
