"""The browser dashboard's figures, with 4 engines, through a real Jupyter client and the page
open in headless Debian Chromium:

- the %pmap slowdown with the page open: `%pmap ident` over 1 000 000 u64 and a CPU-heavy map
  (a 10 ms busy loop per item, 800 items), each run alternately without and with the page, the
  medians compared (the map as the kernel times it, and the whole cell);
- the page's update latency: from a task's end as the kernel records it (the moment its result
  arrives from the engine) to the animation frame after the page has drawn it, for every task
  the page received during the heavy maps (median, 95th percentile);
- its data rate while 4 engines are busy: bytes and frames of server-sent events per second.

Usage: bench/dashboard_bench.py [--runs 5] (needs the parallax kernelspec on JUPYTER_PATH)
"""

import argparse
import re
import statistics
import time

from jupyter_client import KernelManager

from browser import chromium_page


def run(kc, code, timeout=900):
    out = []
    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=out.append)
    elapsed = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"{code!r} failed: {reply['content']}")
    text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    data = "".join(m["content"]["data"].get("text/plain", "") for m in out if m["msg_type"] == "display_data")
    return elapsed, text, data


def map_seconds(text):
    found = re.search(r": map ([\d.]+) s,", text)
    if not found:
        raise SystemExit(f"no summary line in {text!r}")
    return float(found.group(1))


def maps(kc, figures):
    cell, text, _ = run(kc, "%pmap -o out ident 0..1_000_000u64")
    figures["ident_map"].append(map_seconds(text))
    figures["ident_cell"].append(cell)
    cell, text, _ = run(kc, "%pmap -o h heavy 0..800u64")
    figures["heavy_map"].append(map_seconds(text))
    figures["heavy_cell"].append(cell)


def stats(page):
    return page.evaluate(
        "({frames: parallaxStats.frames, bytes: parallaxStats.bytes, latencies: parallaxStats.latencies.length})"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    km = KernelManager(kernel_name="parallax")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    run(kc, "%cluster start -n 4")
    run(
        kc,
        "%%px --local\nfn ident(x: u64) -> u64 { x }\n"
        "fn heavy(x: u64) -> u64 { let t = std::time::Instant::now(); let mut a = x; "
        "while t.elapsed() < std::time::Duration::from_millis(10) { a = a.wrapping_mul(6364136223846793005).wrapping_add(1); } a }",
    )
    run(kc, "%pmap -o warm ident 0..10u64")  # builds the data crate in every context
    _, _, shown = run(kc, "%dashboard")
    run(kc, "%dashboard --stop")  # the notebook's block is not measured, only the page
    url = re.search(r"http://\S+", shown).group(0)

    without = {k: [] for k in ["ident_map", "ident_cell", "heavy_map", "heavy_cell"]}
    with_page = {k: [] for k in without}
    latencies, rates, frame_rates = [], [], []
    for _ in range(args.runs):
        maps(kc, without)
        with chromium_page() as page:
            page.goto(url)
            page.wait_for_function("window.parallaxStats && parallaxStats.frames > 0", timeout=30_000)
            time.sleep(1)
            cell, text, _ = run(kc, "%pmap -o out ident 0..1_000_000u64")
            with_page["ident_map"].append(map_seconds(text))
            with_page["ident_cell"].append(cell)
            before, t0 = stats(page), time.perf_counter()
            cell, text, _ = run(kc, "%pmap -o h heavy 0..800u64")
            after, elapsed = stats(page), time.perf_counter() - t0
            with_page["heavy_map"].append(map_seconds(text))
            with_page["heavy_cell"].append(cell)
            rates.append((after["bytes"] - before["bytes"]) / elapsed)
            frame_rates.append((after["frames"] - before["frames"]) / elapsed)
            latencies += page.evaluate(f"parallaxStats.latencies.slice({before['latencies']})")

    def spread(values):
        return f"{min(values):.3f}-{max(values):.3f}"

    def row(name, key):
        a, b = statistics.median(without[key]), statistics.median(with_page[key])
        return (
            name,
            f"{a:.3f} s ({spread(without[key])})",
            f"{b:.3f} s ({spread(with_page[key])})",
            f"{100 * (b - a) / a:+.1f}%",
        )

    table = [
        row("%pmap ident, 1 000 000 u64: map", "ident_map"),
        row("%pmap ident, 1 000 000 u64: whole cell", "ident_cell"),
        row("%pmap heavy, 800 x 10 ms: map", "heavy_map"),
        row("%pmap heavy, 800 x 10 ms: whole cell", "heavy_cell"),
    ]
    print(f"\n{args.runs} runs each, alternating; median (min-max), 4 engines\n")
    print(f"| {'figure':<42} | {'page closed':>23} | {'page open':>23} | {'median change':>13} |")
    print(f"|{'-' * 44}|{'-' * 25}|{'-' * 25}|{'-' * 15}|")
    for name, a, b, change in table:
        print(f"| {name:<42} | {a:>23} | {b:>23} | {change:>13} |")
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"\nupdate latency, task end to drawn in the page: median {statistics.median(latencies):.0f} ms, "
        f"95th percentile {p95:.0f} ms, max {latencies[-1]:.0f} ms ({len(latencies)} tasks)"
    )
    print(
        f"event stream while 4 engines run the heavy map: {statistics.median(rates) / 1024:.1f} KiB/s, "
        f"{statistics.median(frame_rates):.1f} frames/s (median of {args.runs})"
    )
    kc.stop_channels()
    km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
