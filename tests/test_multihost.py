"""Engines on other hosts through the tools clusters run: ssh, Open MPI's mpiexec and Slurm, for
real, on hosts that are network namespaces of this machine (tests/testbed.py) with their own
hostname and private /tmp. A real kernel drives them through jupyter_client; the controller
listens on the test bed's bridge."""

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (
    ARTIFACTS, RunningKernel, engine_errors, engine_results, interrupt_and_wait, of_type,
    parallax_binary, stream_text, wait_until,
)
from testbed import HEAD_IP, Hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

HEARTBEAT = 3.0


@pytest.fixture(scope="module")
def bed():
    testbed = Hosts(count=2).up()
    try:
        testbed.start_sshd()
        testbed.start_slurm()
        yield testbed
    finally:
        testbed.down()


def launcher_options(bed, launcher):
    """`%cluster start` options for 2 engines on each of host1 and host2."""
    common = f"--ip {HEAD_IP} --remote-parallax {parallax_binary()} --heartbeat-timeout {HEARTBEAT}"
    if launcher == "ssh":
        return f"--launcher ssh --hosts host1:2,host2:2 --ssh-config {bed.ssh_config} {common}"
    if launcher == "mpi":
        subnet = f"{HEAD_IP.rsplit('.', 1)[0]}.0/24"
        return (
            f"--launcher mpi -n 4 --hosts host1:2,host2:2 --ssh-config {bed.ssh_config} "
            f"--mpi-arg=--mca --mpi-arg=oob_tcp_if_include --mpi-arg={subnet} "
            f"--mpi-arg=--mca --mpi-arg=btl_tcp_if_include --mpi-arg={subnet} {common}"
        )
    return f"--launcher slurm -n 4 --nodes 2 {common}"


def values(outputs) -> dict:
    """engine id -> the value it showed, without its `Out[e:n]: ` and a string's quotes."""
    return {
        e: re.sub(r"^Out\[\d+:\d+\]: ", "", text).strip('"')
        for e, text in engine_results(outputs).items()
    }


def ok(kernel, code, timeout=300):
    reply, outputs = kernel.execute(code, timeout=timeout)
    assert reply["content"]["status"] == "ok", (code, reply["content"], outputs)
    return outputs


def start_pool(kernel, bed, launcher):
    outputs = ok(kernel, f"%cluster start {launcher_options(bed, launcher)}", timeout=600)
    text = stream_text(outputs)
    assert re.search(r"Started 4 engines in [\d.]+ s \(ids 0, 1, 2, 3\) on host1, host2", text), text
    return text


def map_report(outputs) -> str:
    """What a %pmap said when it ended."""
    return stream_text(outputs)


def items_per_engine(outputs) -> dict:
    """engine id -> the items it mapped, from the summary a %pmap ends with."""
    per_engine = map_report(outputs).split("items per engine")[-1]
    return {int(e): int(n) for e, n in re.findall(r"(\d+): (\d+)", per_engine)}


@pytest.fixture
def remote_kernel(request, kernelspec, bed):
    running = RunningKernel(ARTIFACTS / f"{request.node.name}.kernel.log")
    yield running
    running.stop()


@pytest.mark.parametrize("launcher", ["ssh", "mpi", "slurm"])
def test_a_pool_on_two_hosts_runs_like_a_local_one(remote_kernel, bed, launcher):
    kernel = remote_kernel
    started = start_pool(kernel, bed, launcher)
    if launcher == "slurm":
        assert re.search(r"Slurm job \d+ RUNNING on host\[1-2\]", started), started
    status = stream_text(ok(kernel, "%cluster status"))
    rows = re.findall(r"^\s+(\d+)\s+\d+\s+(host\d)\s+idle", status, re.M)
    assert sorted(rows) == [("0", "host1"), ("1", "host1"), ("2", "host2"), ("3", "host2")] or (
        sorted(h for _, h in rows) == ["host1", "host1", "host2", "host2"] and len(rows) == 4
    ), status
    assert "Compiled cells" in status and "host1" in status, status
    if launcher == "slurm":
        assert re.search(r"Slurm job \d+ RUNNING", status), status

    # Each engine knows its id and host, and so does %px's output.
    outputs = ok(kernel, '%px format!("{}@{}", parallax_env::engine_id().unwrap(), '
                         'std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim())')
    shown = values(outputs)
    hosts = {e: text.split("@")[1] for e, text in shown.items()}
    assert sorted(shown) == [0, 1, 2, 3], shown
    assert all(text.split("@")[0] == str(e) for e, text in shown.items()), shown
    assert sorted(hosts.values()) == ["host1", "host1", "host2", "host2"], shown
    outputs = ok(kernel, "%px parallax_env::host().unwrap()")
    assert values(outputs) == hosts

    # State persists per engine.
    ok(kernel, "%px let mine = parallax_env::engine_id().unwrap() * 10;")
    outputs = ok(kernel, "%px mine + 1")
    assert values(outputs) == {0: "1", 1: "11", 2: "21", 3: "31"}

    # %pmap over 100 000 items uses all four and equals the local result.
    # A millisecond every hundred items: long enough that every engine gets its share.
    ok(kernel, "%%px --local\nfn twice(x: u64) -> u64 {\n"
               "    if x % 100 == 0 { std::thread::sleep(std::time::Duration::from_millis(1)); }\n"
               "    x * 2 + 1\n}")
    outputs = ok(kernel, "%pmap -o doubled twice 0..100_000u64", timeout=600)
    assert sorted(items_per_engine(outputs)) == [0, 1, 2, 3], map_report(outputs)
    assert all(n > 0 for n in items_per_engine(outputs).values()), map_report(outputs)
    verified = ok(kernel, 'let local: Vec<u64> = (0..100_000u64).map(twice).collect();\n'
                          'assert_eq!(doubled, local);\nprintln!("verified");')
    assert "verified" in stream_text(verified)

    # A scatter/gather round trip.
    ok(kernel, "let numbers: Vec<u64> = (0..1000).collect();")
    ok(kernel, "%scatter part = numbers")
    outputs = ok(kernel, "%px part.len()")
    assert sorted(int(v) for v in values(outputs).values()) == [250, 250, 250, 250]
    ok(kernel, "%gather part -o back")
    verified = ok(kernel, 'assert_eq!(back, numbers);\nprintln!("verified");')
    assert "verified" in stream_text(verified)

    outputs = ok(kernel, "%cluster stop")
    assert "Stopped 4 engines." in stream_text(outputs)
    for host in bed.names:
        assert wait_until(lambda: not bed.parallax_pids_on(host), 10), (
            f"engines left on {host}: {bed.parallax_pids_on(host)}")
    if launcher == "slurm":
        assert wait_until(lambda: not bed.jobs(), 15), bed.jobs()
