"""Engines on other hosts through the tools clusters run: ssh, Open MPI's mpiexec and Slurm, for
real, on hosts that are network namespaces of this machine (tests/testbed.py) with their own
hostname and private /tmp. A real kernel drives them through jupyter_client; the controller
listens on the test bed's bridge."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    ARTIFACTS, RunningKernel, children, engine_errors, engine_results, interrupt_and_wait, of_type,
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
    # Dead engines stay dead here: these tests are about how deaths are named and what goes on
    # without them (test_revival.py is about engines coming back).
    common = (f"--ip {HEAD_IP} --remote-parallax {parallax_binary()} "
              f"--heartbeat-timeout {HEARTBEAT} --no-restart")
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


def timed_cell(kernel, code, timeout=300):
    """Runs a cell, keeping when each output arrived: (reply, [(seconds, message)])."""
    heard = []
    reply = kernel.kc.execute_interactive(
        code, timeout=timeout, output_hook=lambda m: heard.append((time.monotonic(), m))
    )
    return reply, heard


def engine_pids(kernel):
    """engine id -> (pid, host), from %cluster status."""
    status = stream_text(ok(kernel, "%cluster status"))
    return {
        int(e): (int(pid), host)
        for e, pid, host in re.findall(r"^\s+(\d+)\s+(\d+)\s+(host\d)\s", status, re.M)
    }


def test_a_cut_link_and_a_stopped_engine_are_named_and_the_map_completes(remote_kernel, bed):
    kernel = remote_kernel
    start_pool(kernel, bed, "ssh")
    pids = engine_pids(kernel)
    marks = bed.dir / "mapping"
    marks.mkdir()
    # Each engine leaves a mark once it maps (not in /tmp: that is its host's own).
    ok(kernel, "%%px\nstatic MAPPING: std::sync::Once = std::sync::Once::new();\n"
               "fn slow(x: u64) -> u64 {\n"
               f'    MAPPING.call_once(|| std::fs::write(format!("{marks}/{{}}", '
               'parallax_env::engine_id().unwrap()), "").unwrap());\n'
               "    std::thread::sleep(std::time::Duration::from_micros(500));\n    x * 3\n}")
    events = {}
    result = {}

    def run_map():
        result["reply"], result["heard"] = timed_cell(
            kernel, "%pmap -o tripled slow 0..24_000u64", timeout=600)

    worker = threading.Thread(target=run_map, daemon=True)
    worker.start()
    # Once every engine maps: host2's link goes down, and engine 0 (host1) is stopped.
    assert wait_until(lambda: len(list(marks.iterdir())) == 4, 120), list(marks.iterdir())
    events["cut"] = time.monotonic()
    bed.link("host2", up=False)
    stopped_pid = pids[0][0]
    os.kill(stopped_pid, signal.SIGSTOP)
    events["stopped"] = time.monotonic()
    try:
        worker.join(300)
        assert not worker.is_alive(), "the map did not end"
    finally:
        bed.link("host2", up=True)
        os.kill(stopped_pid, signal.SIGCONT)
    assert result["reply"]["content"]["status"] == "ok", result["reply"]["content"]
    said = [(t, m["content"]["text"]) for t, m in result["heard"]
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"]
    bound = HEARTBEAT + 2.0
    for engine, host, at in [(2, "host2", events["cut"]), (3, "host2", events["cut"]),
                             (0, "host1", events["stopped"])]:
        named = [t for t, text in said
                 if f"engine {engine} on {host}: stopped answering" in text]
        assert named, said
        assert named[0] - at < bound, (engine, named[0] - at, said)
    verified = ok(kernel, "let local: Vec<u64> = (0..24_000u64).map(|x| x * 3).collect();\n"
                          'assert_eq!(tripled, local);\nprintln!("verified");', timeout=120)
    assert "verified" in stream_text(verified)
    # Cut off, host2's engines exit by themselves; the stopped one, resumed, exits too.
    assert wait_until(lambda: not bed.parallax_pids_on("host2"), HEARTBEAT + 5), (
        bed.parallax_pids_on("host2"))
    assert wait_until(lambda: not os.path.exists(f"/proc/{stopped_pid}"), HEARTBEAT + 5)
    outputs = ok(kernel, "%px parallax_env::engine_id().unwrap()")
    assert sorted(values(outputs)) == [1]


@pytest.mark.parametrize("launcher", ["ssh", "mpi", "slurm"])
def test_a_killed_kernel_leaves_nothing_on_any_host(kernelspec, bed, launcher):
    kernel = RunningKernel(ARTIFACTS / f"killed_kernel_{launcher}.kernel.log")
    try:
        start_pool(kernel, bed, launcher)
        assert all(bed.parallax_pids_on(host) for host in bed.names)
        if launcher == "slurm":
            assert bed.jobs(), "the job should run"
        os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        for host in bed.names:
            assert wait_until(lambda: not bed.parallax_pids_on(host), HEARTBEAT + 5), (
                host, bed.parallax_pids_on(host))
        if launcher == "slurm":
            assert wait_until(lambda: not bed.jobs(), 15), bed.jobs()
        print(f"{launcher}: nothing left {time.monotonic() - killed:.1f} s after the kill")
    finally:
        kernel.stop()


def test_engines_started_by_hand_join_and_one_with_a_wrong_key_is_refused(remote_kernel, bed):
    kernel = remote_kernel
    ok(kernel, f"%cluster start --launcher ssh --hosts host1:1 --ssh-config {bed.ssh_config} "
               f"--remote-parallax {parallax_binary()} --ip {HEAD_IP} --start-timeout 5",
       timeout=600)
    good = bed.dir / "engine.json"
    said = stream_text(ok(kernel, f"%cluster connection-file {good}"))
    assert f"tcp://{HEAD_IP}:" in said and "mode 0600" in said, said
    assert oct(good.stat().st_mode & 0o777) == "0o600"
    connection = json.loads(good.read_text())
    bad = bed.dir / "wrong-key.json"
    bad.write_text(json.dumps({**connection, "key": "not-the-key"}))
    bad.chmod(0o600)

    # The wrong key: never answered, so it gives up after its registration timeout.
    refused = bed.run_on("host2", [str(parallax_binary()), "engine", "--connect", str(bad)],
                         timeout=60)
    assert refused.returncode != 0
    assert "no answer from the controller" in refused.stderr, refused.stderr
    assert "key" in refused.stderr
    assert "invalid HMAC signature" in kernel.log()

    # The right one joins as a new engine, numbered by the controller.
    joined = subprocess.Popen(
        bed.on_host("host2", [str(parallax_binary()), "engine", "--connect", str(good)]),
        stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: len(engine_pids(kernel)) == 2, 60), engine_pids(kernel)
        outputs = ok(kernel, '%px format!("{}@{}", parallax_env::engine_id().unwrap(), '
                             'parallax_env::host().unwrap())', timeout=600)
        assert values(outputs) == {0: "0@host1", 1: "1@host2"}
        assert "Stopped 2 engines." in stream_text(ok(kernel, "%cluster stop"))
        assert joined.wait(timeout=10) == 0
    finally:
        joined.kill()


def test_the_stop_button_stops_every_engine_on_both_hosts(remote_kernel, bed):
    kernel = remote_kernel
    start_pool(kernel, bed, "ssh")
    result = {}

    marks = bed.dir / "running"
    marks.mkdir()

    def long_cell():
        # Each engine leaves a mark where the test sees it (not /tmp: that is the host's own).
        result["reply"], result["outputs"] = kernel.execute(
            f'%%px\nstd::fs::write(format!("{marks}/{{}}", parallax_env::engine_id().unwrap()), "")'
            ".unwrap();\nstd::thread::sleep(std::time::Duration::from_secs(120));", timeout=300)

    worker = threading.Thread(target=long_cell, daemon=True)
    worker.start()
    assert wait_until(lambda: len(list(marks.iterdir())) == 4, 120), list(marks.iterdir())
    elapsed = interrupt_and_wait(kernel, worker, limit=2)
    print(f"every engine stopped {elapsed:.2f} s after the stop button")
    errors = engine_errors(result["outputs"])
    assert sorted(errors) == [0, 1, 2, 3], result["outputs"]
    # Every engine goes on.
    outputs = ok(kernel, "%px parallax_env::engine_id().unwrap()")
    assert sorted(values(outputs)) == [0, 1, 2, 3]


def test_a_slurm_job_that_cannot_start_says_why_and_is_cancelled(remote_kernel, bed):
    kernel = remote_kernel
    options = f"--launcher slurm -n 3 --nodes 3 --ip {HEAD_IP} --remote-parallax {parallax_binary()}"
    # Blocking: the cell says PENDING and why, live; the stop button cancels the job.
    result = {}

    def start():
        result["reply"], result["heard"] = timed_cell(kernel, f"%cluster start {options}")

    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    assert wait_until(lambda: bed.jobs() and bed.jobs()[0][1] == "PENDING", 20), bed.jobs()
    time.sleep(2)
    interrupt_and_wait(kernel, worker, limit=10)
    said = "".join(m["content"]["text"] for _, m in result["heard"] if m["msg_type"] == "stream")
    # Slurm names the reason PartitionConfig or PartitionNodeLimit, depending on when it looks.
    assert re.search(r"Slurm job \d+ PENDING \(Partition(Config|NodeLimit)\): it asks for more", said), said
    assert wait_until(lambda: not bed.jobs(), 10), bed.jobs()

    # In the background: %cluster status shows the job waiting, and %cluster stop cancels it.
    ok(kernel, f"%cluster start {options} --noblock")
    assert wait_until(lambda: bed.jobs(), 10)
    assert wait_until(
        lambda: re.search(r"Slurm job \d+ PENDING \(Partition(Config|NodeLimit)\)",
                          stream_text(ok(kernel, "%cluster status"))), 10)
    ok(kernel, "%cluster stop")
    assert wait_until(lambda: not bed.jobs(), 10), bed.jobs()


def test_engines_told_a_loopback_address_from_another_host_say_so(remote_kernel, bed):
    kernel = remote_kernel
    began = time.monotonic()
    reply, outputs = kernel.execute(
        f"%cluster start --launcher ssh --hosts host1:1 --ssh-config {bed.ssh_config} "
        f"--remote-parallax {parallax_binary()} --ip 127.0.0.1 --start-timeout 10", timeout=120)
    took = time.monotonic() - began
    assert reply["content"]["status"] == "error", outputs
    text = reply["content"]["evalue"] + stream_text(outputs)
    assert "127.0.0.1, a loopback address" in text and "--ip" in text, text
    assert "host1" in text, text
    assert took < 10, took


def test_a_dep_an_offline_host_cannot_fetch_fails_there_and_says_what_to_do(remote_kernel, bed):
    kernel = remote_kernel
    ok(kernel, f"%cluster start --launcher ssh --hosts host1:1,host2:1 --ssh-config "
               f"{bed.ssh_config} --remote-parallax {parallax_binary()} --ip {HEAD_IP}",
       timeout=600)
    # The test bed's hosts have no route out: a crate missing from the shared cargo cache
    # cannot be had there (and nothing is sent to find out).
    reply, outputs = kernel.execute(
        '%%px --targets 1\n:dep parallax_test_no_such_crate = "1"', timeout=300)
    assert reply["content"]["status"] == "error"
    error = engine_errors(outputs)[1]
    text = error["evalue"] + "".join(error["traceback"])
    assert "This host (host2) cannot reach the crate registry" in text, text
    assert "cargo fetch" in text, text
    outputs = ok(kernel, "%px parallax_env::host().unwrap()")
    assert values(outputs) == {0: "host1", 1: "host2"}


def test_the_dashboard_shows_what_remote_engines_use(remote_kernel, bed):
    kernel = remote_kernel
    ok(kernel, f"%cluster start --launcher ssh --hosts host1:1,host2:1 --ssh-config "
               f"{bed.ssh_config} --remote-parallax {parallax_binary()} --ip {HEAD_IP}",
       timeout=600)

    def rows():
        outputs = ok(kernel, "%dashboard")
        ok(kernel, "%dashboard --stop")
        text = "".join(m["content"]["data"].get("text/plain", "")
                       for m in of_type(outputs, "display_data"))
        # engine, host, pid, state, then the memory its engine reported, in MiB.
        return re.findall(r"^\s+(\d)\s+(host\d)\s+\d+\s+idle\b.*\s([\d.]+) MiB$", text, re.M)

    # Each engine says what it uses with its answer to a keep-alive ping, once a second.
    assert wait_until(lambda: len(rows()) == 2, 10, interval=0.5), rows()
    assert sorted((e, h) for e, h, _ in rows()) == [("0", "host1"), ("1", "host2")]
    assert all(float(mib) > 10 for _, _, mib in rows()), rows()


@pytest.mark.parametrize("launcher", ["ssh", "mpi", "slurm"])
def test_an_engine_killed_on_its_host_is_named_and_the_others_go_on(remote_kernel, bed, launcher):
    kernel = remote_kernel
    start_pool(kernel, bed, launcher)
    pid, host = engine_pids(kernel)[3]
    assert host == "host2"
    os.kill(pid, signal.SIGKILL)
    def named():
        status = stream_text(ok(kernel, "%cluster status"))
        return re.search(r"^\s+3\s+\d+\s+host2\s+dead", status, re.M)
    assert wait_until(named, HEARTBEAT + 5, interval=0.5)
    # mpiexec and srun keep the other ranks and tasks: the pool goes on.
    outputs = ok(kernel, "%px parallax_env::engine_id().unwrap()")
    assert sorted(values(outputs)) == [0, 1, 2]


def mpiexecs(kernel):
    """The mpiexec processes the kernel runs."""
    def is_mpiexec(pid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return False
        return argv0.decode(errors="replace").endswith("mpiexec")
    return [p for p in children(kernel.km.provisioner.pid) if is_mpiexec(p)]


@pytest.mark.parametrize("launcher", ["mpi", "slurm"])
def test_a_killed_engine_comes_back_on_its_host_through_its_launcher(remote_kernel, bed, launcher):
    """Slurm: as a job of one task on its node; MPI: as the one rank of a new mpiexec on its
    host. Either way the first launch's other engines go on, and the pool's stop ends both."""
    kernel = remote_kernel
    options = launcher_options(bed, launcher).replace(" --no-restart", "")
    ok(kernel, f"%cluster start {options}", timeout=600)
    ok(kernel, "%px fn tagged(x: u32) -> u32 { x + 7 }")
    ok(kernel, "%px let kept = 5u32;")
    pid, host = engine_pids(kernel)[3]
    assert host == "host2"
    launches = bed.jobs if launcher == "slurm" else lambda: mpiexecs(kernel)
    assert len(launches()) == 1, launches()
    os.kill(pid, signal.SIGKILL)

    def back():
        status = stream_text(ok(kernel, "%cluster status"))
        row = re.search(r"^\s+3\s+(\d+)\s+host2\s+idle", status, re.M)
        return row and int(row.group(1)) != pid

    assert wait_until(back, 120, interval=1), stream_text(ok(kernel, "%cluster status"))
    assert len(launches()) == 2, launches()
    outputs = ok(kernel, "%px tagged(parallax_env::engine_id().unwrap() as u32)")
    assert values(outputs) == {0: "7", 1: "8", 2: "9", 3: "10"}
    assert values(ok(kernel, "%px parallax_env::host().unwrap()")) == {
        0: "host1", 1: "host1", 2: "host2", 3: "host2"}
    # Its variables died with it; the others' did not.
    reply, outputs = kernel.execute("%px kept")
    assert sorted(values(outputs)) == [0, 1, 2], outputs
    assert "kept" in str(engine_errors(outputs).get(3)), outputs
    ok(kernel, "%cluster stop", timeout=300)
    assert wait_until(lambda: not launches(), 15), launches()
    left = lambda: bed.parallax_pids_on("host1") + bed.parallax_pids_on("host2")
    assert wait_until(lambda: not left(), 15), left()


def test_the_dashboard_restarts_a_dead_remote_engine_on_its_host(remote_kernel, bed):
    kernel = remote_kernel
    ok(kernel, f"%cluster start --launcher ssh --hosts host1:1,host2:1 --ssh-config "
               f"{bed.ssh_config} --remote-parallax {parallax_binary()} --ip {HEAD_IP} "
               f"--heartbeat-timeout {HEARTBEAT} --no-restart", timeout=600)
    outputs = ok(kernel, "%dashboard")
    ok(kernel, "%dashboard --stop")
    text = "".join(m["content"]["data"].get("text/plain", "") for m in of_type(outputs, "display_data"))
    url = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\w+)", text)
    pid, host = engine_pids(kernel)[1]
    assert host == "host2"
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: re.search(r"^\s+1\s+\d+\s+host2\s+dead",
                                        stream_text(ok(kernel, "%cluster status")), re.M),
                      HEARTBEAT + 5, interval=0.5)
    request = urllib.request.Request(
        f"{url.group(1)}/api/engines/1/restart?token={url.group(2)}", method="POST")
    with urllib.request.urlopen(request, timeout=300) as answer:
        assert json.loads(answer.read()) == {"restarted": 1}
    outputs = ok(kernel, "%px parallax_env::host().unwrap()")
    assert values(outputs) == {0: "host1", 1: "host2"}
    assert engine_pids(kernel)[1][0] != pid
