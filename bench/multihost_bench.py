"""Figures for engines on other hosts, per launcher: time until 4 engines on 2 hosts are ready,
`%cluster ping` to them, a trivial `%px` on the 4 remote engines against 4 local ones, and the
time from a cut link (its veth down) to its engines being named dead in a running cell, with
the default heartbeat timeout. Hosts are network namespaces (tests/testbed.py).

Usage: bench/multihost.sh [--runs 20] [--launchers ssh,mpi,slurm]
"""

import argparse
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from jupyter_client import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from testbed import HEAD_IP, Hosts  # noqa: E402

from kernel_latency import timed_cell  # noqa: E402

BINARY = os.environ["PARALLAX_BIN"]


def options(bed, launcher):
    common = f"--ip {HEAD_IP} --remote-parallax {BINARY}"
    subnet = f"{HEAD_IP.rsplit('.', 1)[0]}.0/24"
    return {
        "ssh": f"--launcher ssh --hosts host1:2,host2:2 --ssh-config {bed.ssh_config} {common}",
        "mpi": f"--launcher mpi -n 4 --hosts host1:2,host2:2 --ssh-config {bed.ssh_config} "
               f"--mpi-arg=--mca --mpi-arg=oob_tcp_if_include --mpi-arg={subnet} "
               f"--mpi-arg=--mca --mpi-arg=btl_tcp_if_include --mpi-arg={subnet} {common}",
        "slurm": f"--launcher slurm -n 4 --nodes 2 {common}",
    }[launcher]


def said(kc, code, timeout=600):
    """Runs a cell; returns its stdout."""
    text = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(text)


def ping_median(kc):
    text = said(kc, "%cluster ping -n 200")
    return float(re.search(r"median ([\d.]+) ms", text).group(1))


def px_median(kc, runs):
    timed_cell(kc, "%px let a = 1;")
    return statistics.median(timed_cell(kc, "%px let a = 1;") for _ in range(runs)) * 1000


def cut_to_dead(kc, bed):
    """Seconds from host2's link going down to its engines being named dead in a running cell."""
    heard = {}

    def hook(msg):
        content = msg.get("content", {})
        text = content.get("text", "") + content.get("evalue", "")
        if "host2" in text and "stopped answering" in text and "first" not in heard:
            heard["first"] = time.monotonic()

    def cell():
        kc.execute_interactive(
            "%%px\nstd::thread::sleep(std::time::Duration::from_secs(15));",
            timeout=120, output_hook=hook)

    worker = threading.Thread(target=cell)
    worker.start()
    time.sleep(4)
    cut = time.monotonic()
    bed.link("host2", up=False)
    worker.join(120)
    bed.link("host2", up=True)
    return heard["first"] - cut


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--launchers", default="ssh,mpi,slurm")
    args = parser.parse_args()
    bed = Hosts(2).up()
    rows = []
    try:
        bed.start_sshd()
        bed.start_slurm()
        local_px = None
        for launcher in args.launchers.split(","):
            km = KernelManager(kernel_name="parallax")
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            try:
                began = time.monotonic()
                text = said(kc, f"%cluster start {options(bed, launcher)}")
                ready = time.monotonic() - began
                assert "Started 4 engines" in text and "host1, host2" in text, text
                ping = ping_median(kc)
                remote_px = px_median(kc, args.runs)
                dead = cut_to_dead(kc, bed)
                said(kc, "%cluster stop")
                if local_px is None:
                    began = time.monotonic()
                    said(kc, "%cluster start -n 4")
                    local_ready = time.monotonic() - began
                    local_px = px_median(kc, args.runs)
                    local_ping = ping_median(kc)
                    said(kc, "%cluster stop")
                rows.append((launcher, ready, ping, remote_px, dead))
            finally:
                kc.stop_channels()
                km.shutdown_kernel(now=True)
    finally:
        bed.down()
    print(f"{args.runs} runs of `%px let a = 1;` per figure; medians; heartbeat timeout 5 s (default)")
    print(f"4 local engines ready in {local_ready:.2f} s (on this machine, the same run)")
    print("| launcher | 4 engines on 2 hosts ready | `%cluster ping` | `%px let a = 1;` remote | "
          "local | remote / local | cut link to named dead |")
    print("|---|---|---|---|---|---|---|")
    for launcher, ready, ping, remote_px, dead in rows:
        print(f"| {launcher} | {ready:.2f} s | {ping:.3f} ms (local {local_ping:.3f} ms) | "
              f"{remote_px:.0f} ms | {local_px:.0f} ms | {remote_px / local_px:.2f} | {dead:.2f} s |")


if __name__ == "__main__":
    main()
