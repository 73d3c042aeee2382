"""Kernel start-up and trivial-cell latency, Parallax side by side with evcxr_jupyter.

Figures: time from starting the kernel process to its first kernel_info_reply, time to the first
cell's result, and the median end-to-end latency (execute_request sent to status idle, as a
notebook sees it) of `1 + 1` over 20 runs. Prints a table; nothing here asserts a speed.

Usage: bench/kernel_latency.py PARALLAX_BIN EVCXR_JUPYTER_BIN [--runs 20] [--starts 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client import BlockingKernelClient, KernelManager


def write_spec(data_dir: Path, name: str, argv):
    spec_dir = data_dir / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": name, "language": "rust"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def timed_cell(kc: BlockingKernelClient, code: str, timeout=300) -> float:
    """Seconds from sending execute_request to the idle status that closes it."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            elapsed = time.perf_counter() - t0
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return elapsed


def measure(kernel_name: str, runs: int, starts: int):
    to_info, to_result, latencies = [], [], []
    for start in range(starts):
        km = KernelManager(kernel_name=kernel_name)
        t0 = time.perf_counter()
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.kernel_info(reply=True, timeout=120)
        to_info.append(time.perf_counter() - t0)
        timed_cell(kc, "1 + 1")
        to_result.append(time.perf_counter() - t0)
        if start == starts - 1:
            for _ in range(2):
                timed_cell(kc, "1 + 1")  # warm-up
            latencies = [timed_cell(kc, "1 + 1") for _ in range(runs)]
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {
        "start_to_kernel_info_s": statistics.median(to_info),
        "start_to_first_result_s": statistics.median(to_result),
        "cell_median_s": statistics.median(latencies),
        "cell_p90_s": sorted(latencies)[int(len(latencies) * 0.9) - 1],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("parallax")
    parser.add_argument("evcxr_jupyter")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()

    import os

    data_dir = Path(tempfile.mkdtemp(prefix="parallax-bench-"))
    write_spec(data_dir, "bench-parallax", [args.parallax, "kernel", "--connection-file", "{connection_file}"])
    write_spec(data_dir, "bench-evcxr", [args.evcxr_jupyter, "--control_file", "{connection_file}"])
    os.environ["JUPYTER_PATH"] = str(data_dir)

    results = {}
    # Alternate kernels so that neither gets a systematically quieter machine.
    for name in ("bench-evcxr", "bench-parallax"):
        results[name] = measure(name, args.runs, args.starts)

    p, e = results["bench-parallax"], results["bench-evcxr"]
    rows = [
        ("start to first kernel_info_reply", "start_to_kernel_info_s"),
        ("start to first `1 + 1` result", "start_to_first_result_s"),
        (f"`1 + 1` median of {args.runs}", "cell_median_s"),
        (f"`1 + 1` p90 of {args.runs}", "cell_p90_s"),
    ]
    print(f"| figure | Parallax | evcxr_jupyter 0.22 | Parallax / evcxr |")
    print(f"|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {p[key] * 1000:.1f} ms | {e[key] * 1000:.1f} ms | {p[key] / e[key]:.2f} |")


if __name__ == "__main__":
    main()
