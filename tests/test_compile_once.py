"""Compile once per host: the engines of a host in the same state run what one of them compiled,
and engines whose state diverged compile for themselves. Observed from outside: the shared
library each engine's evaluation process has mapped, the dependency builds in the kernel's log,
and %cluster status."""

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    ARTIFACTS,
    RunningKernel,
    engine_errors,
    engine_results,
    stream_text,
    wait_until,
)

ID_FN = 'fn id() -> u32 { std::env::var("PARALLAX_ENGINE_ID").unwrap().parse().unwrap() }'

# The compiled cell a process loaded last: evcxr names them libcode_<n>.so in the directory of
# the context that compiled them.
LOADED_FN = """fn loaded() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.contains("/libcode_"))
        .max_by_key(|path| {
            path.rsplit("libcode_").next()
                .and_then(|n| n.trim_end_matches(".so").parse::<u64>().ok())
                .unwrap_or(0)
        })
        .unwrap_or("")
        .to_string()
}"""


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_compile_once.kernel.log")
    reply, _ = running.execute("%cluster start -n 3", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute("%%px\n" + ID_FN + "\n" + LOADED_FN)
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


def results(outputs):
    """engine id -> the value of its Out[...] display."""
    return {engine: text.split(": ", 1)[1] for engine, text in engine_results(outputs).items()}


def status(cluster):
    reply, outputs = cluster.execute("%cluster status")
    assert reply["content"]["status"] == "ok"
    return stream_text(outputs)


def loaded_by_engine(cluster):
    reply, outputs = cluster.execute("%px loaded()")
    assert reply["content"]["status"] == "ok", reply["content"]
    return results(outputs)


def test_every_engine_runs_the_one_compiled_cell(cluster):
    paths = loaded_by_engine(cluster)
    assert set(paths) == {0, 1, 2}
    assert len(set(paths.values())) == 1, paths
    assert re.search(r"libcode_\d+\.so", paths[0]), paths
    assert re.search(r"engines 0, 1, 2 on \S+ share compiled cells: engine \d compiles them", status(cluster))


def test_a_dependency_is_built_once_for_the_host(cluster, tmp_path):
    # A crate no engine has seen, so evcxr's cache cannot hide a second build.
    name = f"pxdep_{int(time.time() * 1000)}"
    (tmp_path / "src").mkdir()
    (tmp_path / "Cargo.toml").write_text(
        f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n'
    )
    (tmp_path / "src" / "lib.rs").write_text("pub fn seven() -> u32 { 7 }\n")
    reply, outputs = cluster.execute(
        f'%%px\n:dep {name} = {{ path = "{tmp_path}" }}\n{name}::seven() * id()', timeout=600
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert results(outputs) == {0: "0", 1: "7", 2: "14"}
    builds = re.findall(rf"Compiling {name} v0\.1\.0", cluster.log())
    assert len(builds) == 1, builds


def test_maps_and_transfers_keep_the_engines_together(cluster):
    cluster.execute("%px fn triple(x: u64) -> u64 { x * 3 }")
    reply, outputs = cluster.execute("%pmap -o tripled triple 0..300u64", timeout=300)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, outputs = cluster.execute(
        "assert_eq!(tripled, (0..300u64).map(|x| x * 3).collect::<Vec<u64>>());"
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, outputs = cluster.execute("%scatter numbers = (0..30u64).collect::<Vec<u64>>()")
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, outputs = cluster.execute("%px numbers.len()")
    assert results(outputs) == {0: "10", 1: "10", 2: "10"}
    reply, outputs = cluster.execute("%gather numbers -o back\nback.len()")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "engines 0, 1, 2 on" in status(cluster)
    assert len(set(loaded_by_engine(cluster).values())) == 1


def test_a_panic_that_defines_nothing_keeps_the_engine_sharing(cluster):
    reply, outputs = cluster.execute('%px if id() == 1 { panic!("only here") }')
    assert set(engine_errors(outputs)) == {1}
    assert "engines 0, 1, 2 on" in status(cluster)
    assert len(set(loaded_by_engine(cluster).values())) == 1


def test_a_cell_on_some_engines_only_splits_them_off(cluster):
    reply, _ = cluster.execute("%px --targets 2 let only_here = 1u8;")
    assert reply["content"]["status"] == "ok"
    text = status(cluster)
    assert re.search(r"engines 0, 1 on \S+ share compiled cells", text), text
    assert re.search(r"engine 2 on \S+ compiles its own cells: it ran a cell \(shared cell \d+\) that engines 0, 1 did not", text), text
    reply, outputs = cluster.execute("%px id() * 2")
    assert results(outputs) == {0: "0", 1: "2", 2: "4"}



def dependency_builds(crate):
    """How many times evcxr's compiled-crate cache was filled with or read for this crate: one
    per entry made plus the hits counted in it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evcxr"
    total = 0
    for entry in cache.glob("*") if cache.is_dir() else []:
        meta = entry / "meta"
        if meta.is_file() and f"--crate-name\n{crate}\n" in meta.read_text():
            total += 1 + int((entry / "hits").read_text())
    return total


def test_engines_compiling_for_themselves_take_a_dependency_in_turn(cluster):
    # Each engine runs a cell the others did not, so each compiles its own next cell, at once.
    for engine in range(3):
        reply, _ = cluster.execute(f"%px --targets {engine} let diverged = {engine}u8;")
        assert reply["content"]["status"] == "ok", reply["content"]
    assert re.search(r"engine 0 on \S+ compiles its own cells", status(cluster))
    before = dependency_builds("ryu")
    reply, outputs = cluster.execute(
        '%%px\n:dep ryu = "1"\nryu::Buffer::new().format(id() as f64 + 0.5).to_string()',
        timeout=600,
    )
    assert reply["content"]["status"] == "ok", (reply["content"], engine_errors(outputs))
    assert results(outputs) == {0: '"0.5"', 1: '"1.5"', 2: '"2.5"'}
    # Three builds through the one cache: each read or wrote the entry whole, none lost a count
    # (written at once, the counter is read half-written and a build fails, or counts go lost).
    assert dependency_builds("ryu") == before + 3

def restart(cluster):
    reply, _ = cluster.execute("%cluster restart", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = cluster.execute("%%px\n" + ID_FN + "\n" + LOADED_FN)
    assert reply["content"]["status"] == "ok", reply["content"]


def test_a_panic_that_drops_a_variable_splits_the_engine_off(cluster):
    restart(cluster)
    assert "engines 0, 1, 2 on" in status(cluster)
    cluster.execute("%px let base = 10u64;")
    reply, outputs = cluster.execute('%px let extra = if id() == 1 { panic!("only here") } else { 5u64 };')
    assert set(engine_errors(outputs)) == {1}
    text = status(cluster)
    assert re.search(r"engines 0, 2 on \S+ share compiled cells", text), text
    assert re.search(r"engine 1 on \S+ compiles its own cells: in cell \d+, it panicked here; on engine 0, it ran to the end", text), text
    # Engine 1 never runs code compiled for variables it does not have.
    reply, outputs = cluster.execute("%px base + extra")
    assert results(outputs) == {0: "15", 2: "15"}
    errors = engine_errors(outputs)
    assert set(errors) == {1} and "extra" in errors[1]["evalue"], errors
    reply, outputs = cluster.execute("%px base + 1")
    assert results(outputs) == {0: "11", 1: "11", 2: "11"}
    paths = loaded_by_engine(cluster)
    assert paths[0] == paths[2] and paths[1] != paths[0], paths


def test_a_crash_on_one_engine_is_reported_and_every_engine_keeps_its_state(cluster):
    reply, outputs = cluster.execute("%px let kept = 7u64;")
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, outputs = cluster.execute(
        "%px if id() == 2 { unsafe { std::ptr::null_mut::<u64>().write_volatile(1); } }"
    )
    errors = engine_errors(outputs)
    assert set(errors) == {2} and "CellCrashed" in errors[2]["ename"], errors
    assert "SIGSEGV" in errors[2]["evalue"] and "nothing was lost" in errors[2]["evalue"], errors
    # The crashed cell was rolled back on engine 2: its variables are all there.
    reply, outputs = cluster.execute("%px kept")
    assert results(outputs) == {0: "7", 1: "7", 2: "7"}, engine_errors(outputs)
    # Its history differs from the others' (a rolled-back cell, like a panic): it compiles
    # its own cells from now on.
    text = status(cluster)
    assert re.search(r"engine 2 on \S+ compiles its own cells: in cell \d+, it was stopped or crashed, and rolled back here; engine 0 went on with it", text), text
    reply, outputs = cluster.execute("%px id() + 100")
    assert results(outputs) == {0: "100", 1: "101", 2: "102"}, engine_errors(outputs)


def test_a_store_restarted_after_a_crash_outlives_the_thread_that_restarted_it(cluster):
    """A follower restarts its crashed store from a worker thread that tokio retires after ten
    idle seconds; the store, and what is defined in it, must outlive that thread. (The crash
    takes the store only because a thread an earlier cell started keeps it from running as a
    transaction.)"""
    reply, outputs = cluster.execute(
        "%px if id() == 1 { std::thread::spawn(|| loop { std::thread::park(); }); }"
    )
    assert reply["content"]["status"] == "ok", engine_errors(outputs)
    reply, outputs = cluster.execute(
        "%px if id() == 1 { unsafe { std::ptr::null_mut::<u64>().write_volatile(1); } }"
    )
    assert set(engine_errors(outputs)) == {1}, engine_errors(outputs)
    assert "ProcessDied" in engine_errors(outputs)[1]["ename"], engine_errors(outputs)
    reply, outputs = cluster.execute("%px let after_crash = id() + 200;")
    assert reply["content"]["status"] == "ok", engine_errors(outputs)
    time.sleep(12)
    reply, outputs = cluster.execute("%px after_crash")
    assert results(outputs) == {0: "200", 1: "201", 2: "202"}, engine_errors(outputs)


def test_the_engines_following_a_leader_that_dies_keep_what_ran(cluster):
    restart(cluster)
    cluster.execute("%px let a = 1u64;")
    reply, outputs = cluster.execute("%cluster status")
    text = stream_text(outputs)
    leader = int(re.search(r"engine (\d) compiles them", text).group(1))
    pids = {
        int(row.split()[0]): int(row.split()[1])
        for row in text.splitlines()[1:]
        if row[:6].strip().isdigit()
    }
    outputs = []
    worker = threading.Thread(
        daemon=True,
        target=lambda: cluster.kc.execute_interactive(
            '%px println!("going"); std::thread::sleep(std::time::Duration::from_secs(4)); '
            "let b = a + id() as u64;",
            timeout=120,
            output_hook=outputs.append,
        )
    )
    worker.start()
    assert wait_until(lambda: stream_text(outputs).count("going") == 3, 60), outputs
    os.kill(pids[leader], signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive()
    errors = engine_errors(outputs)
    assert set(errors) == {leader} and "EngineDied" in errors[leader]["ename"], errors
    others = sorted(set(pids) - {leader})
    # The others ran the whole cell: its variable is there, and they share a context again.
    reply, outputs = cluster.execute("%px a + b", timeout=300)
    assert results(outputs) == {e: str(1 + 1 + e) for e in others}, engine_errors(outputs)
    text = status(cluster)
    assert f"engines {others[0]}, {others[1]} on" in text, text
