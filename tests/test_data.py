"""Data at memory speed on one host: %push, %scatter, %pull and %gather through shared memory,
with 4 real engines. Each round trip is checked in Rust in the notebook against its source;
shared memory is looked for in /dev/shm after each transfer, interrupt, and kill."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    ARTIFACTS,
    RunningKernel,
    check,
    ok,
    descendants,
    engine_results,
    stream_text,
    wait_until,
)

SHM = Path(os.environ.get("PARALLAX_SHM_DIR", "/dev/shm"))
MIB = 1 << 20

TYPES = """%%px --local
:dep serde = { version = "1", features = ["derive"] }
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
struct Inner { tag: String, weights: Vec<f32> }
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
struct Record { id: u64, name: String, values: Vec<f64>, inner: Option<Inner> }
"""


def shared_files():
    """Every file in a Parallax shared memory directory, whoever made it."""
    return sorted(str(f) for d in SHM.glob("parallax-shm-*") for f in d.iterdir())


def shared_dirs_of(pid):
    return sorted(SHM.glob(f"parallax-shm-{pid}-*"))


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_data.kernel.log")
    reply, _ = running.execute("%cluster start -n 4", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute(TYPES, timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


def test_a_value_of_a_cell_defined_type_outlives_the_first_transfer(cluster):
    """Runs first, before any transfer: the data crate must not be added under its feet."""
    ok(cluster, 'let before = Record { id: 3, name: "r".into(), values: vec![0.5], inner: None };')
    ok(cluster, "%push first = 1u8")
    check(cluster, "assert_eq!(before.id, 3);")


VALUES = {
    "empty": ("f64", "Vec::<f64>::new()"),
    "seven-bytes": ("u8", "(0..7u8).collect::<Vec<u8>>()"),
    "odd-65537-bytes": ("u8", "(0..65_537u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>()"),
    "odd-f32": ("f32", "(0..100_003).map(|i| i as f32 * 0.5).collect::<Vec<f32>>()"),
    "strings": ("String", "(0..100_003).map(|i| format!(\"s{i}\")).collect::<Vec<String>>()"),
    "nested-struct": (
        "Record",
        "(0..5_001u64).map(|i| Record { id: i, name: format!(\"r{i}\"), "
        "values: vec![i as f64; (i % 5) as usize], "
        "inner: (i % 3 == 0).then(|| Inner { tag: format!(\"t{i}\"), weights: vec![0.5; (i % 4) as usize] }) })"
        ".collect::<Vec<Record>>()",
    ),
    "100-MiB-f64": ("f64", "(0..100 * 131_072).map(|i| i as f64 * 0.25).collect::<Vec<f64>>()"),
}


def round_trip(kernel, item, expr, engines):
    """`source` scattered and gathered, pushed and pulled from `engines` engines: equal to
    itself each time, checked in Rust in the notebook."""
    ok(kernel, f"let source: Vec<{item}> = {expr};")
    ok(kernel, "%scatter part = source", timeout=600)
    ok(kernel, "%gather part -o gathered", timeout=600)
    check(kernel, "assert_eq!(gathered, source);")
    ok(kernel, "%push whole = source", timeout=600)
    ok(kernel, "%pull whole -o pulled", timeout=600)
    check(kernel, f"assert_eq!(pulled.len(), {engines}); assert!(pulled.iter().all(|w| w == &source));")


@pytest.mark.parametrize("name", list(VALUES))
def test_round_trips_equal_the_source(cluster, name):
    round_trip(cluster, *VALUES[name], engines=4)
    assert shared_files() == []


def test_a_gibibyte_round_trips_and_the_kernel_stays_small(cluster):
    kernel_pid = cluster.km.provisioner.pid
    ok(cluster, "let big: Vec<f64> = (0..128 * MIB_F64).map(|i| i as f64).collect();".replace(
        "MIB_F64", str(MIB // 8 * 8)))
    ok(cluster, "%push big = big")
    status = Path(f"/proc/{kernel_pid}/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    print(f"kernel peak resident memory after a 1 GiB push to 4 engines: {peak_kib / 1024:.0f} MiB")
    assert peak_kib * 1024 < 2 * 1024 * MIB, peak_kib
    outputs = ok(cluster, "%px (big.len(), big[big.len() - 1])")
    assert {v.split(": ", 1)[1] for v in engine_results(outputs).values()} == {"(134217728, 134217727.0)"}
    ok(cluster, "%scatter part = big")
    ok(cluster, "%gather part -o big_back")
    check(cluster, "assert_eq!(big_back, big);")
    ok(cluster, "%pull -t 2 big -o pulled_big")
    check(cluster, "assert_eq!(pulled_big.len(), 1); assert!(pulled_big[0] == big);")
    ok(cluster, "drop(big_back); drop(pulled_big);")
    assert shared_files() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_values_too_big_for_shared_memory_go_through_the_sockets(kernelspec, tmp_path):
    """A container's /dev/shm is often 64 MiB: a value that does not fit still moves."""
    small = tmp_path / "small-shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "tmpfs", str(small)], check=True)
    try:
        kernel = RunningKernel(ARTIFACTS / "test_data_small_shm.kernel.log",
                               env={"PARALLAX_SHM_DIR": str(small)})
        try:
            ok(kernel, "%cluster start -n 2", timeout=600)
            round_trip(kernel, "f64", f"(0..{40 * MIB // 8}).map(|i| i as f64 * 0.5).collect()", engines=2)
            assert [f for d in small.iterdir() for f in d.iterdir()] == []
        finally:
            kernel.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def engine_pids(cluster):
    _, outputs = cluster.execute("%cluster status")
    rows = [r.split() for r in stream_text(outputs).splitlines()[1:] if r[:6].strip().isdigit()]
    return {int(r[0]): int(r[1]) for r in rows}


def reading_shared_memory(pid):
    """Whether a process below `pid` has a file of Parallax shared memory open."""
    for proc in [pid] + descendants(pid):
        try:
            for fd in os.listdir(f"/proc/{proc}/fd"):
                if "/parallax-shm-" in os.readlink(f"/proc/{proc}/fd/{fd}"):
                    return True
        except OSError:
            continue
    return False


def start(cluster, code, timeout=600):
    """Runs a cell on a thread of its own; its reply and outputs land in the dict returned."""
    result = {}

    def run():
        try:
            result.update(zip(("reply", "outputs"), cluster.execute(code, timeout=timeout)))
        except Exception as e:  # a killed kernel never answers
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, result


# Strings take their engines seconds to decode: long enough to be caught reading.
SLOW_VALUE = "let slow: Vec<String> = (0..12_000_000).map(|i| format!(\"item number {i}\")).collect();"


def test_a_long_transfer_shows_its_progress_in_place(cluster):
    ok(cluster, SLOW_VALUE)
    outputs = ok(cluster, "%push slow_copy = slow")
    shown = [m for m in outputs if m["msg_type"] == "display_data"
             and m["content"].get("transient", {}).get("display_id", "").startswith("transfer-")]
    assert len(shown) == 1, outputs
    display_id = shown[0]["content"]["transient"]["display_id"]
    frames = [shown[0]["content"]["data"]["text/plain"]] + [
        m["content"]["data"]["text/plain"] for m in outputs
        if m["msg_type"] == "update_display_data" and m["content"]["transient"]["display_id"] == display_id
    ]
    assert frames[0].startswith("%push slow_copy: "), frames
    last = frames[-1]
    assert re.search(r"of [\d.]+ [KMG]iB on the engines, [\d.]+ \w+/s; 4 of 4 engines done \(0, 1, 2, 3\)", last), frames


def mapping_shared_memory(pid):
    """Whether process `pid` has a file of Parallax shared memory mapped."""
    try:
        return "/parallax-shm-" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_a_map_reads_its_items_where_the_notebook_wrote_them(cluster):
    ok(cluster, "%%px --local\nfn slow_half(x: f64) -> f64 {\n"
                "    if x as u64 % 100_000 == 0 { std::thread::sleep(std::time::Duration::from_millis(300)); }\n"
                "    x / 2.0\n}")
    ok(cluster, "let many: Vec<f64> = (0..2_000_000).map(|i| i as f64).collect();")
    pids = engine_pids(cluster)
    assert not any(mapping_shared_memory(p) for p in pids.values())
    worker, result = start(cluster, "%pmap -o halves slow_half many")
    # Each engine maps the chunk it works on from the notebook's shared memory: no copy of
    # the items passes through the kernel's socket.
    assert wait_until(lambda: any(mapping_shared_memory(p) for p in pids.values()), 120)
    worker.join(300)
    assert result["reply"]["content"]["status"] == "ok", result
    check(cluster, "assert_eq!(halves, many.iter().map(|x| x / 2.0).collect::<Vec<f64>>());")
    ok(cluster, "drop(halves); drop(many);")
    assert shared_files() == []


def test_the_stop_button_interrupts_a_transfer_and_leaves_every_context_usable(cluster):
    ok(cluster, SLOW_VALUE)
    pids = engine_pids(cluster)
    worker, result = start(cluster, "%push slow_copy = slow")
    assert wait_until(lambda: any(reading_shared_memory(p) for p in pids.values()), 120)
    cluster.km.interrupt_kernel()
    worker.join(60)
    assert not worker.is_alive()
    content = result["reply"]["content"]
    assert content["status"] == "error", content
    assert wait_until(lambda: shared_files() == [], 10), shared_files()
    outputs = ok(cluster, "%px 20 + 1")
    assert [v.split(": ", 1)[1] for v in engine_results(outputs).values()] == ["21"] * 4
    check(cluster, "assert_eq!(slow.len(), 12_000_000);")


def test_a_sigkilled_engine_mid_transfer_leaves_no_shared_memory(cluster):
    """Runs last: it leaves the pool with three engines."""
    ok(cluster, SLOW_VALUE)
    pids = engine_pids(cluster)
    worker, result = start(cluster, "%push slow_copy = slow")
    assert wait_until(lambda: reading_shared_memory(pids[3]), 120)
    os.kill(pids[3], signal.SIGKILL)
    worker.join(300)
    assert not worker.is_alive()
    content = result["reply"]["content"]
    assert content["status"] == "error" and "engine 3" in content["evalue"], content
    assert wait_until(lambda: shared_files() == [] and not shared_dirs_of(pids[3]), 10), (
        shared_files(), shared_dirs_of(pids[3]))
    outputs = ok(cluster, "%px --targets 0,1,2 slow_copy.len()")
    assert [v.split(": ", 1)[1] for v in engine_results(outputs).values()] == ["12000000"] * 3


def test_a_sigkilled_kernel_leaves_shared_memory_that_the_next_start_removes(kernelspec):
    first = RunningKernel(ARTIFACTS / "test_data_killed.kernel.log")
    try:
        ok(first, "%cluster start -n 2")
        ok(first, SLOW_VALUE)
        kernel_pid = first.km.provisioner.pid
        pids = engine_pids(first)
        start(first, "%push slow_copy = slow", timeout=30)
        assert wait_until(lambda: any(reading_shared_memory(p) for p in pids.values()), 120)
        os.kill(kernel_pid, signal.SIGKILL)
        left = shared_dirs_of(kernel_pid)
        assert left and any(d.iterdir() for d in left), left
        # The next start comes once the killed kernel is gone, as Jupyter restarts a dead
        # kernel: a process with gigabytes mapped takes a while to end after SIGKILL, and
        # until it has, its directories are rightly left alone.
        killed = time.monotonic()
        assert wait_until(lambda: not first.km.is_alive(), 60)
        print(f"the killed kernel ended {time.monotonic() - killed:.1f} s after SIGKILL")
    finally:
        first.log_file.close()
        first.kc.stop_channels()
        first.km.cleanup_resources()
    second = RunningKernel(ARTIFACTS / "test_data_next.kernel.log")
    try:
        ok(second, "1 + 1")
        assert shared_dirs_of(kernel_pid) == []
    finally:
        second.stop()

