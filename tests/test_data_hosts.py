"""Data between hosts: values that cross a link to engines on other hosts (network namespaces of
this machine, tests/testbed.py, reached with ssh) with a real kernel driving them through
jupyter_client: round trips equal to their source, one crossing of a host's link for all its
engines, and a value altered on the way refused."""

import json
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import (
    ARTIFACTS, RunningKernel, check, engine_results, ok, parallax_binary, stream_text, wait_until,
)
from test_data import MIB, TYPES, VALUES, round_trip, shared_files, start
from testbed import HEAD_IP, Hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture(scope="module")
def bed():
    testbed = Hosts(count=2).up()
    try:
        testbed.start_sshd()
        yield testbed
    finally:
        testbed.down()


@pytest.fixture
def kernel(request, kernelspec, bed):
    running = RunningKernel(ARTIFACTS / f"{request.node.name}.kernel.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pool(kernelspec, bed):
    """Two engines on each of host1 and host2, none on this one."""
    running = RunningKernel(ARTIFACTS / "test_data_hosts.pool.kernel.log")
    try:
        ok(running, f"%cluster start --launcher ssh --hosts host1:2,host2:2 --ssh-config "
                    f"{bed.ssh_config} --remote-parallax {parallax_binary()} --ip {HEAD_IP}",
           timeout=600)
        ok(running, TYPES, timeout=600)
        yield running
    finally:
        running.stop()


def hosts_of(kernel):
    """engine id -> its host, from %cluster status."""
    _, outputs = kernel.execute("%cluster status")
    rows = [r.split() for r in stream_text(outputs).splitlines()[1:] if r[:6].strip().isdigit()]
    return {int(r[0]): r[2] for r in rows}


@pytest.mark.parametrize("name", list(VALUES))
def test_round_trips_to_two_other_hosts_equal_the_source(pool, name):
    round_trip(pool, *VALUES[name], engines=4)
    assert shared_files() == []


def test_a_gibibyte_round_trips_to_two_other_hosts(pool):
    ok(pool, f"let big: Vec<f64> = (0..{128 * MIB}).map(|i| i as f64).collect();")
    ok(pool, "%scatter part = big", timeout=600)
    ok(pool, "%gather part -o big_back", timeout=600)
    check(pool, "assert_eq!(big_back, big); drop(big_back);")
    ok(pool, "%px drop(part);")
    ok(pool, "%push big = big", timeout=600)
    outputs = ok(pool, "%px (big.len(), big[big.len() - 1])")
    assert {v.split(": ", 1)[1] for v in engine_results(outputs).values()} == {"(134217728, 134217727.0)"}
    ok(pool, "%pull -t 3 big -o pulled_big", timeout=600)
    check(pool, "assert_eq!(pulled_big.len(), 1); assert!(pulled_big[0] == big);")
    ok(pool, "drop(pulled_big); drop(big);")
    ok(pool, "%px drop(big);")
    assert shared_files() == []
    # Parts in flight, not whole values: the kernel never holds a second copy of the value.
    status = Path(f"/proc/{pool.km.provisioner.pid}/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    print(f"kernel peak resident memory after 1 GiB to and from two other hosts: {peak_kib / 1024:.0f} MiB")
    assert peak_kib * 1024 < 2 * 1024 * MIB, peak_kib


def test_a_push_to_two_engines_of_a_host_crosses_its_link_once(pool, bed):
    host1 = sorted(e for e, host in hosts_of(pool).items() if host == "host1")
    assert len(host1) == 2, hosts_of(pool)
    ok(pool, f"let hundred: Vec<f64> = (0..{100 * MIB // 8}).map(|i| i as f64).collect();")
    # What the head sends to host1: the bridge's side of host1's veth pair.
    counter = Path(f"/sys/class/net/{bed.bridge}v1/statistics/tx_bytes")
    before = int(counter.read_text())
    ok(pool, f"%push -t {','.join(map(str, host1))} copy = hundred", timeout=600)
    sent = int(counter.read_text()) - before
    print(f"a 100 MiB push to host1's 2 engines sent {sent / MIB:.1f} MiB to host1")
    assert 100 * MIB < sent < 1.2 * 100 * MIB, sent
    outputs = ok(pool, f"%px -t {','.join(map(str, host1))} copy.len() == {100 * MIB // 8}")
    assert [v.split(": ", 1)[1] for v in engine_results(outputs).values()] == ["true"] * 2
    ok(pool, "%px -t {} drop(copy);".format(",".join(map(str, host1))))
    assert shared_files() == []


def test_the_stop_button_stops_a_value_on_its_way_to_other_hosts(pool):
    ok(pool, f"let stopped: Vec<f64> = vec![0.5; {128 * MIB}];")
    worker, result = start(pool, "%push stopped_copy = stopped")
    # Once the first part is in a carrier's shared memory, the value is on its way.
    assert wait_until(lambda: any("/carried-" in f for f in shared_files()), 120), shared_files()
    pool.km.interrupt_kernel()
    worker.join(60)
    assert not worker.is_alive()
    content = result["reply"]["content"]
    assert content["status"] == "error" and content["ename"] == "Interrupted", content
    assert "stored nowhere" in content["evalue"], content
    assert wait_until(lambda: shared_files() == [], 10), shared_files()
    outputs = ok(pool, "%px 20 + 1")
    assert [v.split(": ", 1)[1] for v in engine_results(outputs).values()] == ["21"] * 4
    reply, outputs = pool.execute("%px stopped_copy.len()")
    assert "cannot find value `stopped_copy`" in str(outputs), outputs
    ok(pool, "drop(stopped);")


def engine_pids(kernel):
    _, outputs = kernel.execute("%cluster status")
    rows = [r.split() for r in stream_text(outputs).splitlines()[1:] if r[:6].strip().isdigit()]
    return {int(r[0]): int(r[1]) for r in rows}


class TamperingProxy:
    """A TCP relay on the test bed's head between an engine and its controller that, once armed, alters
    one byte of what the controller sends, `after` bytes later: inside a big value's bytes."""

    def __init__(self, target_host, target_port, after):
        self.target = (target_host, target_port)
        self.after = after
        self.armed = threading.Event()
        self.altered = threading.Event()
        # On the test bed's bridge: an address this test run made, reachable from its hosts.
        self.listener = socket.create_server((HEAD_IP, 0))
        self.port = self.listener.getsockname()[1]
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing:
            try:
                engine_side, _ = self.listener.accept()
            except OSError:
                return
            controller_side = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(engine_side, controller_side, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(controller_side, engine_side, True), daemon=True).start()

    def _pipe(self, source, sink, from_controller):
        seen = 0
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if from_controller and self.armed.is_set() and not self.altered.is_set():
                    if seen + len(data) > self.after:
                        data = bytearray(data)
                        data[self.after - seen] ^= 0xFF
                        self.altered.set()
                    seen += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self):
        self.closing = True
        self.listener.close()


def test_a_value_altered_on_the_wire_is_refused_and_nothing_is_stored(kernel, bed):
    ok(kernel, f"%cluster start -n 1 --ip {HEAD_IP}", timeout=600)
    connection_path = bed.dir / "engine.json"
    ok(kernel, f"%cluster connection-file {connection_path}")
    connection = json.loads(connection_path.read_text())
    host, port = re.match(r"tcp://([\d.]+):(\d+)", connection["url"]).groups()
    proxy = TamperingProxy(host, int(port), after=1 << 20)
    relayed = bed.dir / "relayed.json"
    relayed.write_text(json.dumps({**connection, "url": f"tcp://{HEAD_IP}:{proxy.port}"}))
    relayed.chmod(0o600)
    engine = subprocess.Popen(
        bed.on_host("host1", [str(parallax_binary()), "engine", "--connect", str(relayed)]),
        stderr=subprocess.PIPE, text=True)
    try:
        joined = lambda: engine.poll() is not None or len(engine_pids(kernel)) == 2
        assert wait_until(joined, 600) and engine.poll() is None, engine_pids(kernel)
        ok(kernel, "let value: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();")
        ok(kernel, "%push -t 1 before = 7u8", timeout=600)
        proxy.armed.set()
        reply, outputs = kernel.execute("%push kept = value", timeout=600)
        assert proxy.altered.is_set()
        content = reply["content"]
        assert content["status"] == "error", content
        assert "engine 1" in content["evalue"] and "altered on the way" in content["evalue"], content
        assert "engine 0" not in content["evalue"], content
        # Nothing stored where the bytes were altered; the engine of this host has the value.
        outputs = ok(kernel, "%px --targets 0 kept.len()")
        assert [v.split(": ", 1)[1] for v in engine_results(outputs).values()] == ["4194304"]
        reply, outputs = kernel.execute("%px --targets 1 kept.len()")
        assert "cannot find value `kept`" in str(outputs), outputs
        # The engine goes on: the same value, unaltered now, is stored and comes back equal.
        ok(kernel, "%push -t 1 kept = value", timeout=600)
        ok(kernel, "%pull -t 1 kept -o back")
        check(kernel, "assert_eq!(back[0], value);")
    finally:
        engine.kill()
        stderr = engine.communicate(timeout=30)[1]
        proxy.close()
    # The value crossed to host1 once, carried into its shared memory: that is where it was refused.
    assert re.search(r"engine 1: refused the values of carry: buffer 0 \(4194304 bytes\) altered", stderr), stderr
