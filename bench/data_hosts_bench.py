"""push, scatter, pull and gather of 100 MiB and 1 GiB with 4 engines on 2 other hosts (2 each),
Parallax against ipyparallel 9.2 in one run, timed as bench/peers_bench.py times them (whole
cells, the same cells with 8 bytes, marginal rates), and the bytes a 100 MiB push to all 4
engines sends each host. Hosts are network namespaces of this machine (tests/testbed.py):
Parallax reaches them with its ssh launcher, ipyparallel's controller listens on the test bed's
bridge and its engines are started in the namespaces.

Usage: bench/data_hosts.sh [--runs 3]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from testbed import HEAD_IP, Hosts  # noqa: E402

from peers_bench import IPP_SETUP, MIB, Kernel, measure_moves, print_moves, stop_kernels  # noqa: E402

BINARY = os.environ["PARALLAX_BIN"]
PEERS_PYTHON = os.environ["PEERS_PYTHON"]

IPP_CONTROLLER = """
cluster = ipp.Cluster(n=0, controller_ip="{ip}", log_level=40)
await cluster.start_controller()
info = await cluster.controller.get_connection_info()
engine_file = "{path}"
with open(engine_file, "w") as f:
    json.dump(info["engine"], f)
"""

IPP_CONNECT = """
rc = await cluster.connect_client()
rc.wait_for_engines(4, timeout=300)
dv = rc[:]
dv.activate()
"""


def start_ipengines(bed, engine_file):
    """Two ipyparallel engines on each host, from the controller's engine connection file."""
    engines = []
    for host in bed.names:
        for _ in range(2):
            argv = [PEERS_PYTHON, "-m", "ipyparallel.engine", f"--file={engine_file}", "--log-level=40"]
            engines.append(subprocess.Popen(bed.on_host(host, argv), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
    return engines


def sent_to_hosts(bed, kernel, cell):
    """MiB the head sent each host while `cell` ran."""
    counters = {host: Path(f"/sys/class/net/{bed.bridge}v{i}/statistics/tx_bytes")
                for i, host in enumerate(bed.names, 1)}
    before = {host: int(c.read_text()) for host, c in counters.items()}
    kernel.cell(cell)
    return {host: (int(c.read_text()) - before[host]) / MIB for host, c in counters.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bed = Hosts(2).up()
    kernels, ipengines = [], []
    try:
        bed.start_sshd()
        px = Kernel("parallax", kernels)
        px.cell(f"%cluster start --launcher ssh --hosts host1:2,host2:2 --ssh-config {bed.ssh_config} "
                f"--remote-parallax {BINARY} --ip {HEAD_IP}")
        ipy = Kernel("bench-ipython", kernels)
        ipy.cell(IPP_SETUP)
        engine_file = bed.dir / "ipengine.json"
        ipy.cell(IPP_CONTROLLER.format(ip=HEAD_IP, path=engine_file))
        engine_file.chmod(0o600)
        ipengines = start_ipengines(bed, engine_file)
        ipy.cell(IPP_CONNECT)
        px.cell(f"let hundred: Vec<f64> = (0..{100 * MIB // 8}).map(|i| i as f64).collect();")
        ipy.cell(f"hundred = numpy.arange({100 * MIB // 8}, dtype=numpy.float64)")
        crossing = {
            "Parallax": sent_to_hosts(bed, px, "%push hundred_e = hundred"),
            "ipyparallel": sent_to_hosts(bed, ipy, "dv.push({'hundred_e': hundred}, block=True)"),
        }
        px.cell("%px drop(hundred_e);")
        px.cell("drop(hundred);")
        ipy.cell("dv.execute('del hundred_e', block=True); del hundred")
        figures = measure_moves(px, ipy, args.runs)
    finally:
        stop_kernels(kernels)
        for engine in ipengines:
            engine.kill()
            engine.wait()
        bed.down()
    print(f"\n4 engines on 2 other hosts (2 each), {args.runs} runs, medians.")
    print("\nBytes the head sent each host during a 100 MiB push to all 4 engines:\n")
    print("| | host1 | host2 |")
    print("|---|---|---|")
    for who, sent in crossing.items():
        print(f"| {who} | {sent['host1']:.1f} MiB | {sent['host2']:.1f} MiB |")
    print_moves(figures)


if __name__ == "__main__":
    main()
