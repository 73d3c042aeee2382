"""%pmap and data movement figures with 2 engines, through a real Jupyter client.

- `%pmap` identity over 1 000 000 u64: items/s of the map itself, as the kernel measures it
  from the first chunk sent to the last result in (the compile of the map's cells is reported
  apart), and the whole cell as the notebook sees it.
- A CPU-heavy function (a 10 ms busy loop per item, 400 items) on 1 engine and on 2: speed-up.
- `%push`, `%scatter` and `%pull` of 100 MiB: the marginal rate, 100 MiB over (time of the
  100 MiB cell minus time of the same cell with 8 bytes), so that the fixed cost of compiling the
  generated cells is taken out; the whole cell's time is shown too.

Usage: bench/pmap_bench.py [--runs 3] (needs the parallax kernelspec on JUPYTER_PATH)
"""

import argparse
import re
import statistics
import time

from jupyter_client import KernelManager

MIB = 1 << 20


def run(kc, code, timeout=900):
    out = []
    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=out.append)
    elapsed = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"{code!r} failed: {reply['content']}")
    text = "".join(
        m["content"]["text"] for m in out if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    return elapsed, text


def map_figures(text):
    found = re.search(r": map ([\d.]+) s, ([\d.]+ ?[kM]?) items/s \(compiling and set-up ([\d.]+) s apart\)", text)
    if not found:
        raise SystemExit(f"no summary line in {text!r}")
    return float(found.group(1)), float(found.group(3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    km = KernelManager(kernel_name="parallax")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    run(kc, "%cluster start -n 2")
    run(
        kc,
        "%%px --local\nfn ident(x: u64) -> u64 { x }\n"
        "fn heavy(x: u64) -> u64 { let t = std::time::Instant::now(); let mut a = x; "
        "while t.elapsed() < std::time::Duration::from_millis(10) { a = a.wrapping_mul(6364136223846793005).wrapping_add(1); } a }",
    )
    run(kc, "%pmap -o warm ident 0..10u64")  # builds the data crate in every context
    rows = []

    maps, cells, compiles = [], [], []
    for _ in range(args.runs):
        cell, text = run(kc, "%pmap -o out ident 0..1_000_000u64")
        map_s, compile_s = map_figures(text)
        maps.append(map_s)
        cells.append(cell)
        compiles.append(compile_s)
    rows.append(("`%pmap ident` over 1 000 000 u64: map, items/s", f"{1e6 / statistics.median(maps) / 1e6:.2f} M/s ({statistics.median(maps) * 1000:.0f} ms)"))
    rows.append(("same: compiling and set-up of the map's cells, apart", f"{statistics.median(compiles):.2f} s"))
    rows.append(("same: whole cell as the notebook sees it", f"{statistics.median(cells):.2f} s ({1e6 / statistics.median(cells) / 1e3:.0f} k items/s)"))

    one, text = run(kc, "%pmap -t 0 -o h1 heavy 0..400u64")
    one_map = map_figures(text)[0]
    two, text = run(kc, "%pmap -o h2 heavy 0..400u64")
    two_map = map_figures(text)[0]
    rows.append(("heavy (10 ms x 400): map on 1 engine", f"{one_map:.2f} s"))
    rows.append(("heavy (10 ms x 400): map on 2 engines", f"{two_map:.2f} s"))
    rows.append(("speed-up, 2 engines against 1 (map / whole cell)", f"{one_map / two_map:.2f}x / {one / two:.2f}x"))

    n = 100 * MIB // 8
    run(kc, f"let big: Vec<u64> = (0..{n}u64).collect(); let tiny: Vec<u64> = vec![1];")
    for name, small, large in (
        ("%push", "%push p = tiny", "%push p = big"),
        ("%scatter", "%scatter s = tiny", "%scatter s = big"),
        ("%pull", "%pull tiny_back", "%pull s_back"),
    ):
        if name == "%pull":
            # Each engine holds 50 MiB of the scattered vector: pull brings back 100 MiB.
            run(kc, "%px let s_back = s.clone(); let tiny_back = 1u64;")
            small, large = "%pull -o t tiny_back", "%pull -o b s_back"
        run(kc, small)
        run(kc, large)
        small_t = statistics.median(run(kc, small)[0] for _ in range(args.runs))
        large_t = statistics.median(run(kc, large)[0] for _ in range(args.runs))
        rate = 100 / max(large_t - small_t, 1e-6)
        rows.append((f"`{name}` 100 MiB: marginal MiB/s (cell s, 8-byte cell s)", f"{rate:.0f} MiB/s ({large_t:.2f} s, {small_t:.2f} s)"))

    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    kc.stop_channels()
    km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
