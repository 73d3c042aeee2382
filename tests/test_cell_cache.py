"""Cells cheaper than a compile, through jupyter_client with real kernels and engines: one build
per expression cell, and the compiled-cell cache (a cell run again is not built; what it
depends on changing builds it again; damaged entries are built again; kernels share it, at
once and one after another; the cells %pmap and %scatter generate are built once). Builds are counted by `%cache`."""

import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    ARTIFACTS,
    RunningKernel,
    engine_results,
    interrupt_and_wait,
    of_type,
    ok,
    stream_text,
)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cells"


def start_kernel(name, cache_dir, **env):
    return RunningKernel(
        ARTIFACTS / f"{name}.kernel.log", env={"PARALLAX_CELL_CACHE": str(cache_dir), **env}
    )


@pytest.fixture
def kernel(request, kernelspec, cache_dir):
    running = start_kernel(request.node.name, cache_dir)
    yield running
    running.stop()


def builds(kernel):
    """`%cache`'s table: {"notebook": (compiled, cached, failed), "engine 0": (...), ...}."""
    rows = {}
    for line in stream_text(ok(kernel, "%cache")).splitlines():
        m = re.match(r"^(notebook|engine \d+) [^\d]*?(\d+)\s+(\d+)\s+(\d+)\s", line + " ")
        if m:
            rows[m.group(1)] = tuple(int(n) for n in m.groups()[1:])
    assert "notebook" in rows, rows
    return rows


class Counted:
    """Runs a cell and says how the notebook's builds moved: (compiled, cached, failed)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def run(self, code, who="notebook"):
        before = builds(self.kernel)
        outputs = ok(self.kernel, code)
        after = builds(self.kernel)
        moved = tuple(a - b for a, b in zip(after[who], before.get(who, (0, 0, 0))))
        return outputs, moved


def shown(outputs):
    """The data of the cell's results, whatever message carried them."""
    return [
        m["content"]["data"]
        for m in outputs
        if m["msg_type"] in ("execute_result", "display_data")
    ]


def plain(outputs):
    return [data["text/plain"] for data in shown(outputs)]


RICH_AND_PLAIN = """
#[derive(Debug)]
pub struct Rich;
impl Rich {
    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT text/html\\n<b>rich</b>\\nEVCXR_END_CONTENT");
    }
}
#[derive(Debug)]
pub struct Plain(u32);
"""


def test_an_expression_cell_builds_once_with_or_without_a_rich_display(kernel):
    counted = Counted(kernel)
    ok(kernel, RICH_AND_PLAIN)
    outputs, moved = counted.run("Rich")
    assert moved == (1, 0, 0), moved
    assert shown(outputs) == [{"text/html": "<b>rich</b>"}]
    outputs, moved = counted.run("Plain(3)")
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["Plain(3)"]
    outputs, moved = counted.run('vec![(1u8, "a")]')
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ['[(1, "a")]']
    # :fmt changes the display as before, and back.
    ok(kernel, ":fmt {:#?}")
    assert plain(ok(kernel, "(1, 2)")) == ["(\n    1,\n    2,\n)"]
    ok(kernel, ":fmt")
    assert plain(ok(kernel, "(1, 2)")) == ["(1, 2)"]
    # A trait of the notebook's that gives a Debug type `evcxr_display` still shows it, as
    # evcxr would (the stand-in steps aside for good after one ambiguous build).
    ok(
        kernel,
        "pub trait Show { fn evcxr_display(&self); }\n"
        "#[derive(Debug)] pub struct Img;\n"
        "impl Show for Img { fn evcxr_display(&self) { "
        'println!("EVCXR_BEGIN_CONTENT text/html\\n<i>img</i>\\nEVCXR_END_CONTENT"); } }',
    )
    assert shown(ok(kernel, "Img")) == [{"text/html": "<i>img</i>"}]


def test_a_cell_run_again_is_not_built_and_says_the_same(kernel):
    counted = Counted(kernel)
    ok(kernel, "let x = 41u32;")
    first, moved = counted.run("x + 1")
    assert moved == (1, 0, 0), moved
    # Run again unchanged, nothing run since: its compiled cell runs again in the notebook's
    # store, without evcxr, cargo or rustc (no build, not even a cached one).
    again, moved = counted.run("x + 1")
    assert moved == (0, 0, 0), moved
    assert plain(first) == plain(again) == ["42"]
    printing = 'println!("x is {x}"); x * 2'
    first, moved = counted.run(printing)
    assert moved == (1, 0, 0), moved
    again, moved = counted.run(printing)
    assert moved == (0, 0, 0), moved
    assert stream_text(again) == stream_text(first) == "x is 41\n"
    assert plain(again) == plain(first) == ["82"]
    # A cell that defines a variable, run again: the store then holds it already; evcxr runs
    # it, and its build is found in the cache.
    ok(kernel, "let y = x * 2;")
    _, moved = counted.run("let y = x * 2;")
    assert moved == (0, 1, 0), moved
    outputs, moved = counted.run('println!("{y}");')
    assert stream_text(outputs) == "82\n"
    # Anything else run meanwhile (here a new type for `x`): evcxr runs the cell again.
    ok(kernel, "let x = 41u64;")
    outputs, moved = counted.run("x + 1")
    assert sum(moved) == 1 and plain(outputs) == ["42"], moved


def test_a_remembered_cell_stopped_or_crashing_says_so_and_the_notebook_goes_on(kernel, tmp_path):
    """A cell run again from memory behaves as evcxr's run would: the stop button stops it, a
    crash is reported, and either way the store rolls the cell back, so that nothing is lost
    and the notebook goes on."""
    ok(kernel, "let kept = 7u32;")
    counted = Counted(kernel)
    sleeper, crasher = tmp_path / "sleep", tmp_path / "crash"
    sleepy = (f'if std::path::Path::new("{sleeper}").exists() '
              "{ std::thread::sleep(std::time::Duration::from_secs(120)); } kept")
    crashing = f'if std::path::Path::new("{crasher}").exists() {{ std::process::abort(); }} kept + 1'
    for code, expected in [(sleepy, "7"), (crashing, "8")]:
        first, moved = counted.run(code)
        assert moved == (1, 0, 0) and plain(first) == [expected], (moved, plain(first))
        again, moved = counted.run(code)
        assert moved == (0, 0, 0) and plain(again) == [expected], (moved, plain(again))
    # The remembered sleepy cell, stopped.
    ok(kernel, sleepy)  # evcxr ran the crashing cell last: this one is remembered again
    sleeper.write_text("")
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("reply", kernel.execute(sleepy, timeout=300)))
    worker.start()
    time.sleep(1.0)
    interrupt_and_wait(kernel, worker, limit=30)
    content = result["reply"][0]["content"]
    assert content["ename"] == "Interrupted" and "nothing was lost" in content["evalue"], content
    assert plain(ok(kernel, "kept * 6")) == ["42"]
    # The remembered crashing cell, crashing.
    ok(kernel, crashing)
    ok(kernel, crashing)
    crasher.write_text("")
    reply, outputs = kernel.execute(crashing)
    content = reply["content"]
    assert content["ename"] == "CellCrashed" and "SIGABRT" in content["evalue"], content
    assert "nothing was lost" in content["evalue"], content
    assert plain(ok(kernel, "kept * 6")) == ["42"]


def write_dependency(root: Path, version: str):
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "Cargo.toml").write_text(
        f'[package]\nname = "cache_probe"\nversion = "{version}"\nedition = "2021"\n'
    )
    (root / "src" / "lib.rs").write_text(
        f'pub fn version() -> &\'static str {{ "{version}" }}\n'
    )


def test_what_a_cell_depends_on_changing_builds_it_again(kernel, tmp_path):
    counted = Counted(kernel)
    # The type of a variable it uses.
    ok(kernel, "let z = 5u8;")
    _, moved = counted.run("z + 1")
    assert moved == (1, 0, 0)
    _, moved = counted.run("z + 1")
    assert moved == (0, 0, 0)  # run again from memory
    ok(kernel, "let z = 300u16;")
    outputs, moved = counted.run("z + 1")
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["301"]
    # A function it calls.
    ok(kernel, "fn f() -> u32 { 1 }")
    assert plain(counted.run("f() + 1")[0]) == ["2"]
    ok(kernel, "fn f() -> u32 { 10 }")
    outputs, moved = counted.run("f() + 1")
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["11"]
    # A dependency's version.
    dependency = tmp_path / "cache_probe"
    write_dependency(dependency, "0.1.0")
    ok(kernel, f':dep cache_probe = {{ path = "{dependency}" }}', timeout=600)
    outputs, moved = counted.run("cache_probe::version()")
    assert plain(outputs) == ['"0.1.0"']
    assert counted.run("cache_probe::version()")[1] == (0, 0, 0)
    # The dependency's source changes: the cell is not run from memory, cargo builds it.
    write_dependency(dependency, "0.2.0")
    outputs, moved = counted.run("cache_probe::version()")
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ['"0.2.0"']
    # The optimisation level.
    ok(kernel, ":opt 1", timeout=600)
    outputs, moved = counted.run("f() + 1")
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["11"]


def test_a_damaged_or_missing_entry_is_built_again_not_loaded(kernel, cache_dir):
    counted = Counted(kernel)
    ok(kernel, "let w = 7u32;")
    assert counted.run("w * 6")[1] == (1, 0, 0)
    libraries = list(cache_dir.glob("*/library"))
    assert libraries, list(cache_dir.iterdir())
    for library in libraries:
        library.write_bytes(b"\x7fELF not a library any more")

    others = iter(range(100))

    def run_through_the_cache():
        # A cell that changes the state first (a new variable): `w * 6` is then not run
        # again from memory, but built.
        ok(kernel, f"let other{next(others)} = 1u8;")
        return counted.run("w * 6")

    outputs, moved = run_through_the_cache()
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["42"]
    assert "is damaged" in kernel.log()
    shutil.rmtree(cache_dir)
    outputs, moved = run_through_the_cache()
    assert moved == (1, 0, 0), moved
    assert plain(outputs) == ["42"]
    assert run_through_the_cache()[1] == (0, 1, 0)


def test_two_kernels_sharing_the_cache_both_get_right_results(kernelspec, cache_dir):
    kernels = [start_kernel(f"cache_sharer_{i}", cache_dir) for i in range(2)]
    cells = [(f"let v{i} = {i}u64 * 3;", None) for i in range(4)]
    cells += [(f"v{i} + {i}", str(4 * i)) for i in range(4)]
    failures = []

    def run_all(kernel):
        try:
            for code, expected in cells:
                outputs = ok(kernel, code)
                if expected is not None and plain(outputs) != [expected]:
                    failures.append((code, plain(outputs)))
        except AssertionError as e:
            failures.append(str(e))

    try:
        workers = [threading.Thread(target=run_all, args=(k,)) for k in kernels]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(600)
        assert not failures, failures
        counts = [builds(k)["notebook"] for k in kernels]
        # Every cell was built or found by each kernel, and none failed.
        for compiled, cached, failed in counts:
            assert failed == 0 and compiled + cached >= len(cells), counts
        for k in kernels:
            assert "is damaged" not in k.log() and "unreadable" not in k.log()
    finally:
        for k in kernels:
            k.stop()


NOTEBOOK = [
    ("#[derive(Debug, Clone, PartialEq)]\npub struct Point { x: u64 }", []),
    ("let p = Point { x: 3 };", []),
    ("let a = 1u64;", []),
    ("a + p.x", ["4"]),
    ("let q = p.clone();", []),
    ("q", ["Point { x: 3 }"]),
    # evcxr's first build of a cell that moves a variable puts it back, and fails; the
    # second leaves it out. Found in the cache, the first must not pass for the second.
    ("let part = vec![1u8, 2];", []),
    ("drop(part);", []),
]


def test_a_notebook_run_again_in_a_new_kernel_is_not_built(kernelspec, cache_dir):
    first = start_kernel("cache_first_kernel", cache_dir)
    try:
        for code, expected in NOTEBOOK:
            assert plain(ok(first, code)) == expected, code
        # Each cell, and the kernel's own cell that sets up the notebook's context; and the
        # first try at `drop(part)`.
        compiled, cached, failed = builds(first)["notebook"]
        assert compiled >= len(NOTEBOOK) and cached == 0 and failed == 1, (compiled, cached, failed)
    finally:
        first.stop()
    # A new kernel, its own evcxr context in a new directory: every cell is found. (No
    # standby engine: the only context compiling in this kernel's log is the notebook's.)
    second = start_kernel("cache_second_kernel", cache_dir, PARALLAX_STANDBY="0")
    try:
        for code, expected in NOTEBOOK:
            assert plain(ok(second, code)) == expected, code
        assert builds(second)["notebook"] == (0, compiled, failed)
        # The context's dependencies are built once, not again with each `let` cell: the
        # dependencies evcxr restores from its crate cache, first built in a context that is
        # gone now, must not name files of that context's directory.
        rebuilt = re.findall(r"Compiling (\S+)", second.log())
        assert rebuilt.count("parallax_data") == 1, rebuilt
        # A cell built here takes values that cached libraries stored, of a type a cell
        # defined: both kinds of library know the type as the same one. (It takes every
        # variable the context knows of: `part` too, had the first try been taken.)
        counted = Counted(second)
        outputs, moved = counted.run("let r = Point { x: q.x * 2 };\nr == Point { x: 6 } && p == q")
        assert moved == (1, 0, 0), moved
        assert plain(outputs) == ["true"]
        assert "was redefined" not in str(outputs), outputs
        assert plain(ok(second, "r")) == ["Point { x: 6 }"]
    finally:
        second.stop()


def start_two_engines(kernel):
    """Starts engines 0 and 1; returns what reads their builds from `%cache`."""
    text = stream_text(ok(kernel, "%cluster start -n 2", timeout=600))
    assert "Started 2 engines" in text, text

    def engine_builds():
        counts = builds(kernel)
        return {engine: counts[engine] for engine in ("engine 0", "engine 1")}

    return engine_builds


def test_a_second_pmap_and_scatter_build_nothing_on_the_engines(kernel):
    engine_builds = start_two_engines(kernel)

    ok(kernel, "%%px\nfn cube(x: u64) -> u64 { x * x * x }")
    ok(kernel, "%pmap -o c1 cube 0..1000u64")
    before = engine_builds()
    assert sum(compiled for compiled, _, _ in before.values()) > 0, before
    ok(kernel, "%pmap -o c2 cube 5..3000u64")
    after = engine_builds()
    for engine in after:
        assert after[engine][0] == before[engine][0], (engine, before, after)
    assert plain(ok(kernel, "(c2.len(), c2[0], c2[2994])")) == ["(2995, 125, 26973008999)"]
    # The same map again: its generated cells rebind variables that exist, of the same types,
    # so once they ran that way they run again from memory, with no build at all (not even a
    # cached one), in the notebook and on the engines.
    again = "%pmap -o c2 cube 5..3000u64"
    ok(kernel, again)
    before, notebook_before = engine_builds(), builds(kernel)["notebook"]
    ok(kernel, again)
    assert engine_builds() == before and builds(kernel)["notebook"] == notebook_before
    assert plain(ok(kernel, "(c2.len(), c2[0], c2[2994])")) == ["(2995, 125, 26973008999)"]
    ok(kernel, "%scatter part = (0..100u64).collect::<Vec<_>>()")
    before = engine_builds()
    ok(kernel, "%scatter part = (7..50u64).collect::<Vec<_>>()")
    after = engine_builds()
    for engine in after:
        assert after[engine][0] == before[engine][0], (engine, before, after)
    lengths = engine_results(ok(kernel, "%px part.len()"))
    assert {engine: text.split(": ", 1)[1] for engine, text in lengths.items()} == {
        0: "22",
        1: "21",
    }


def test_a_px_cell_run_again_is_replayed_without_evcxr(kernel):
    engine_builds = start_two_engines(kernel)

    def values(code):
        return {e: t.split(": ", 1)[1] for e, t in engine_results(ok(kernel, code)).items()}

    ok(kernel, "%px let a0 = parallax_env::engine_id().unwrap() as u64;")
    assert values("%px a0 + 1") == {0: "1", 1: "2"}
    before = engine_builds()
    # Again: the compiled cell is replayed, with no build at all (not even a cache hit).
    assert values("%px a0 + 1") == {0: "1", 1: "2"}
    assert engine_builds() == before
    _, outputs = kernel.execute('%px println!("seen {}", a0);')
    assert "[stdout:1] seen 1" in stream_text(outputs)
    # A definition changes the state: the same text builds again, against the new type.
    ok(kernel, "%px let a0 = 200u8;")
    assert values("%px a0 + 1") == {0: "201", 1: "201"}
    status = stream_text(ok(kernel, "%cluster status"))
    assert "engines 0, 1 on" in status and "share compiled cells" in status, status
