"""Engine pool figures: time for `%cluster start -n 4` to be ready, end-to-end latency of
`%px let a = 1;` on 1, 2 and 4 engines next to the same cell run locally, and the engines'
memory. Latency is execute_request sent to status idle, as a notebook sees it.

Usage: bench/px_latency.py [--runs 10] (needs the parallax kernelspec on JUPYTER_PATH)
"""

import argparse
import os
import statistics
import time

from jupyter_client import KernelManager

from kernel_latency import timed_cell


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    km = KernelManager(kernel_name="parallax")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    timed_cell(kc, "1")  # the local context is built
    start = timed_cell(kc, "%cluster start -n 4", timeout=900)
    rows = [("`%cluster start -n 4` until ready", f"{start:.2f} s")]
    local = [timed_cell(kc, "let a = 1;") for _ in range(args.runs)]
    rows.append(("`let a = 1;` locally, median", f"{statistics.median(local) * 1000:.0f} ms"))
    for targets, n in (("0", 1), ("0:2", 2), ("all", 4)):
        code = f"%px --targets {targets} let a = 1;"
        timed_cell(kc, code)  # each engine's first variable cell loads rust-analyzer's std
        runs = [timed_cell(kc, code) for _ in range(args.runs)]
        rows.append((f"`%px let a = 1;` on {n} engine(s), median", f"{statistics.median(runs) * 1000:.0f} ms"))
    def is_engine(pid):
        try:
            return b"\0engine\0" in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            return False

    engines = [p for p in children(km.provisioner.pid) if is_engine(p)]
    per_engine = []
    for engine in engines:
        total = rss_kib(engine) + sum(rss_kib(c) for c in children(engine))
        per_engine.append(total / 1024)
    rows.append(
        (
            "memory per engine (engine + its evaluation process, RSS)",
            f"{statistics.median(per_engine):.0f} MiB median, {sum(per_engine):.0f} MiB for {len(per_engine)}",
        )
    )
    kc.stop_channels()
    km.shutdown_kernel()
    print("| figure | value |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
