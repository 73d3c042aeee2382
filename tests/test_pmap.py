"""%pmap, %scatter, %gather, %push and %pull through jupyter_client, with real engine processes.

Each check compares against the same computation in the notebook's own context, in Rust, so the
assertion is about the values that landed there, not about printed text."""

import os
import re
import signal
import threading

import pytest

from conftest import (
    ARTIFACTS,
    RunningKernel,
    check,
    engine_results,
    interrupt_and_wait,
    of_type,
    ok,
    store_processes,
    stream_text,
    wait_until,
)

FUNCS = """%%px --local
fn square(x: u64) -> u64 { x.wrapping_mul(x) ^ 0x5a }
fn label(x: u64) -> String { format!("#{x}") }
fn picky(x: u64) -> u64 { if x % 100 == 37 { panic!("no {x}") } x + 1 }
fn shout(s: String) -> String { s.to_uppercase() }
fn slow(x: u64) -> u64 { std::thread::sleep(std::time::Duration::from_millis(10)); x * 3 }
"""


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_pmap.kernel.log")
    reply, outputs = running.execute("%cluster start -n 2", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute(FUNCS, timeout=300)
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


def error(cluster, code, timeout=300):
    reply, outputs = cluster.execute(code, timeout=timeout)
    assert reply["content"]["status"] == "error", (code, outputs)
    return reply["content"]


def engine_displays(outputs):
    """The engines' Out[...] displays, without the progress block a slow cell may show."""
    return [m for m in of_type(outputs, "display_data") if "engine" in m["content"]["metadata"]]


def all_contexts_usable(cluster):
    outputs = ok(cluster, "%px 20 + 1")
    shown = [m["content"]["data"]["text/plain"] for m in engine_displays(outputs)]
    assert len(shown) == 2 and all(s.endswith(": 21") for s in shown), shown
    outputs = ok(cluster, "40 + 2")
    assert any(
        m["content"]["data"].get("text/plain") == "42" for m in of_type(outputs, "execute_result")
    ), outputs


@pytest.mark.parametrize(
    "flags, input_expr, expected",
    [
        ("", "Vec::<u64>::new()", "Vec::<u64>::new()"),
        ("", "vec![7u64]", "vec![square(7)]"),
        ("--chunk 10", "0..1001u64", "(0..1001u64).map(square).collect::<Vec<_>>()"),
        ("--chunk 3", "0..7", "(0..7u64).map(square).collect::<Vec<_>>()"),
        ("", "0..200_000u64", "(0..200_000u64).map(square).collect::<Vec<_>>()"),
    ],
    ids=["empty", "one", "chunk-10-of-1001", "untyped-range-of-7", "200000"],
)
def test_pmap_equals_the_local_map(cluster, flags, input_expr, expected):
    outputs = ok(cluster, f"%pmap {flags} -o mapped square {input_expr}")
    assert re.search(r"mapped: Vec<u64> with \d+ results", stream_text(outputs)), outputs
    check(cluster, f"assert_eq!(mapped, {expected});")


def test_pmap_with_strings_and_default_chunks(cluster):
    ok(cluster, "let numbers: Vec<u64> = (0..5003).collect();")
    ok(cluster, "%pmap -o labels label &numbers")
    check(
        cluster,
        "assert_eq!(labels, numbers.iter().map(|&x| label(x)).collect::<Vec<String>>());"
        "assert_eq!(numbers.len(), 5003);",
    )


def test_pmap_on_chosen_targets(cluster):
    outputs = ok(cluster, "%pmap -t 1 -o on_one square 0..50u64")
    assert "from engines 1: map" in stream_text(outputs), outputs
    check(cluster, "assert_eq!(on_one, (0..50u64).map(square).collect::<Vec<_>>());")


def test_closure_cell_form(cluster):
    outputs = ok(cluster, "%%pmap -o squares 0..1000u64\n|x: u64| x * x")
    assert "squares: Vec<u64> with 1000 results" in stream_text(outputs)
    check(cluster, "assert_eq!(squares, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());")


def test_a_boxed_closure_on_the_engines_is_borrowed_not_moved(cluster):
    ok(cluster, "%px let bump: Box<dyn Fn(u64) -> u64> = Box::new(|x| x + 100);")
    ok(cluster, "%pmap -o bumped bump 0..10u64")
    ok(cluster, "%pmap -o bumped_again bump 0..10u64")
    check(
        cluster,
        "assert_eq!(bumped, (100..110u64).collect::<Vec<_>>()); assert_eq!(bumped, bumped_again);",
    )


def test_unordered_gives_the_same_multiset(cluster):
    ok(cluster, "%pmap --unordered --chunk 7 -o loose square 0..3000u64")
    check(
        cluster,
        "let mut a = loose.clone(); a.sort();"
        "let mut b: Vec<u64> = (0..3000u64).map(square).collect(); b.sort();"
        "assert_eq!(a, b);",
    )


def test_a_panicking_item_reports_its_index(cluster):
    content = error(cluster, "%pmap -o p picky 0..500u64")
    assert content["ename"] == "MapError", content
    # The lowest failing index, the engine and the panic message.
    assert re.search(r"item 37 panicked on engine [01]: no 37", content["evalue"]), content
    all_contexts_usable(cluster)


def test_skip_errors_keeps_going_and_reports_indices(cluster):
    outputs = ok(cluster, "%pmap --skip-errors -o kept picky 0..500u64")
    text = stream_text(outputs)
    assert "5 items failed" in text and "37, 137, 237, 337, 437" in text, text
    check(
        cluster,
        "assert_eq!(kept, (0..500u64).filter(|x| x % 100 != 37).map(|x| x + 1).collect::<Vec<_>>());"
        "assert_eq!(kept_failed, vec![37usize, 137, 237, 337, 437]);",
    )


def test_scatter_then_gather_round_trips(cluster):
    ok(cluster, "let data: Vec<u64> = (0..10_001).map(|x| x * 7).collect();")
    outputs = ok(cluster, "%scatter part = data")
    assert "part: Vec<u64> on engines 0, 1 (5001/5000 items each)" in stream_text(outputs)
    outputs = ok(cluster, "%px (part.len(), part[0])")
    shown = sorted(m["content"]["data"]["text/plain"] for m in engine_displays(outputs))
    assert shown[0].startswith("Out[0:") and shown[0].endswith("(5001, 0)"), shown
    assert shown[1].startswith("Out[1:") and shown[1].endswith("(5000, 35007)"), shown
    ok(cluster, "%gather part -o back")
    check(cluster, "assert_eq!(back, data);")
    # Strings, and a value that is not a Vec: items of an iterator.
    ok(cluster, "%scatter words = (0..11).map(|i| format!(\"w{i}\"))")
    ok(cluster, "%gather words -o words_back")
    check(
        cluster,
        "assert_eq!(words_back, (0..11).map(|i| format!(\"w{i}\")).collect::<Vec<String>>());",
    )


def test_push_and_pull_per_engine_values(cluster):
    ok(cluster, "%push base = 1000u64")
    ok(cluster, "%px let mine = base + parallax_env::engine_id().unwrap() as u64;")
    outputs = ok(cluster, "%pull mine -o all")
    assert "all: Vec<u64> with 2 values from engines 0, 1" in stream_text(outputs)
    check(cluster, "assert_eq!(all, vec![1000u64, 1001]);")
    ok(cluster, '%push -t 1 greeting = String::from("hi")')
    ok(cluster, "%pull -t 1 greeting")
    check(cluster, 'assert_eq!(greeting, vec!["hi".to_string()]);')
    content = error(cluster, "%pull -t 0 greeting")
    assert "engine 0: there is no variable `greeting` there" in content["evalue"], content
    content = error(cluster, "%gather base")
    assert "%pull brings back single values" in content["evalue"], content
    all_contexts_usable(cluster)


def test_non_serializable_types_are_refused_clearly(cluster):
    ok(cluster, "struct Opaque(u8);\nlet opaque = Opaque(1);")
    content = error(cluster, "%push o = opaque")
    assert content["ename"] == "DataError" and "Serialize" in content["evalue"], content
    ok(cluster, "%%px\nstruct Opaque(u8);\nfn wrap(x: u64) -> Opaque { Opaque(x as u8) }")
    content = error(cluster, "%pmap wrap 0..3u64")
    assert "Serialize" in content["evalue"], content
    all_contexts_usable(cluster)
    check(cluster, "assert_eq!(opaque.0, 1);")


def test_missing_function_is_named(cluster):
    content = error(cluster, "%pmap no_such_function 0..3u64")
    assert "`no_such_function` is not defined on the engines" in content["evalue"], content
    all_contexts_usable(cluster)


def test_type_mismatch_is_clear(cluster):
    # The function takes a String; the items are numbers.
    content = error(cluster, "%pmap shout 0..3u64")
    assert content["ename"] == "TypeMismatch", content
    assert "are `u64`" in content["evalue"] and "takes `alloc::string::String`" in content["evalue"]
    # The function takes u64; the items are strings.
    content = error(cluster, '%pmap square vec!["a".to_string()]')
    assert "does not yield items of type `u64`" in content["evalue"], content
    all_contexts_usable(cluster)
    ok(cluster, "%pmap -o after square 0..10u64")
    check(cluster, "assert_eq!(after, (0..10u64).map(square).collect::<Vec<_>>());")


def test_progress_display_updates_in_place(cluster):
    outputs = ok(cluster, "%pmap -o tripled slow 0..300u64")
    shown = of_type(outputs, "display_data")
    updates = of_type(outputs, "update_display_data")
    assert shown and updates, outputs
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    final = updates[-1]["content"]["data"]["text/plain"]
    assert "done: 300/300 items" in final, final
    assert "text/html" in updates[-1]["content"]["data"]
    check(cluster, "assert_eq!(tripled, (0..300u64).map(|x| x * 3).collect::<Vec<_>>());")


def test_timeout_stops_the_map_and_keeps_the_engines(cluster):
    content = error(cluster, "%pmap --timeout 1 -o never slow 0..5000u64")
    assert content["ename"] == "Timeout", content
    assert re.search(r"stopped after 1(\.0)? s with \d+ of 5000 items done", content["evalue"]), content
    all_contexts_usable(cluster)


def start_long_map(cluster, code):
    """Runs `code` in a thread; returns once its progress display is up, with the thread, a dict
    that receives the reply, and the list the outputs go to."""
    outputs, result = [], {}
    progress = threading.Event()

    def hook(msg):
        outputs.append(msg)
        if msg["msg_type"] == "display_data" and "display_id" in msg["content"].get("transient", {}):
            progress.set()

    worker = threading.Thread(
        daemon=True,
        target=lambda: result.setdefault(
            "reply", cluster.kc.execute_interactive(code, timeout=300, output_hook=hook)
        )
    )
    worker.start()
    assert progress.wait(120), outputs
    return worker, result, outputs


def test_interrupt_stops_the_map(cluster):
    worker, result, _ = start_long_map(cluster, "%pmap -o never slow 0..5000u64")
    interrupt_and_wait(cluster, worker, limit=10)
    content = result["reply"]["content"]
    assert content["status"] == "error" and content["ename"] == "Interrupted", content
    assert re.search(r"interrupted with \d+ of 5000 items done", content["evalue"]), content
    all_contexts_usable(cluster)


def engine_pids(cluster):
    _, status_out = cluster.execute("%cluster status")
    # The engine table, without the section on compiled cells below it.
    rows = [r.split() for r in stream_text(status_out).splitlines()[1:] if r[:6].strip().isdigit()]
    return {int(r[0]): int(r[1]) for r in rows if r[1].isdigit()}


def start_map_served_by_engine_1(cluster, marks):
    """Starts `%pmap -o survived marked 0..600u64` (each item times 3, slowly) and returns
    once engine 1 serves it: an engine that compiles its own cells (after a death) may start
    serving well after engine 0. The first item each engine computes leaves a mark."""
    ok(cluster, "%%px --local\nfn marked(x: u64) -> u64 {\n"
                "    let engine = std::env::var(\"PARALLAX_ENGINE_ID\").unwrap_or_default();\n"
                f'    let _ = std::fs::write(format!("{marks}/serving-{{engine}}"), "");\n'
                "    std::thread::sleep(std::time::Duration::from_millis(10));\n"
                "    x * 3\n}")
    worker, result, outputs = start_long_map(cluster, "%pmap -o survived marked 0..600u64")
    assert wait_until(lambda: (marks / "serving-1").exists(), 120), outputs
    return worker, result, outputs


@pytest.mark.parametrize("victim", ["fork", "supervisor"])
def test_a_store_killed_mid_map_still_gives_every_result(cluster, victim, tmp_path):
    """Engine 1 follows engine 0's compiled cells. Killed there: the fork running the serving
    cell (the cell is rolled back, the engine keeps its variables) or the whole store (its
    variables are lost). Either way engine 1 stops serving at once, its chunks run again on
    engine 0, and the map is complete."""
    ok(cluster, "%px let before_the_map = 7u64;")
    engine = engine_pids(cluster)[1]
    worker, result, outputs = start_map_served_by_engine_1(cluster, tmp_path)
    assert wait_until(lambda: store_processes(engine)[victim], 30), store_processes(engine)
    os.kill(store_processes(engine)[victim][0], signal.SIGKILL)
    worker.join(300)
    assert not worker.is_alive()
    assert result["reply"]["content"]["status"] == "ok", (result, outputs)
    said = stream_text(outputs, "stderr")
    assert re.search(r"engine 1 stopped: ", said), outputs
    check(cluster, "assert_eq!(survived, (0..600u64).map(|x| x * 3).collect::<Vec<_>>());")
    _, kept = cluster.execute("%px before_the_map")
    expected = {0: "7", 1: "7"} if victim == "fork" else {0: "7"}
    assert values_of(kept) == expected, kept
    assert values_of(ok(cluster, "%px slow(1)")) == {0: "3", 1: "3"}


def values_of(outputs):
    return {e: t.split(": ", 1)[1] for e, t in engine_results(outputs).items()}


def test_sigkill_of_an_engine_mid_map_still_gives_every_result(cluster, tmp_path):
    """Engine 1 is killed once it serves the map: its chunks in flight run again on engine 0."""
    engine = engine_pids(cluster)[1]
    worker, result, outputs = start_map_served_by_engine_1(cluster, tmp_path)
    os.kill(engine, signal.SIGKILL)
    worker.join(300)
    assert not worker.is_alive()
    assert result["reply"]["content"]["status"] == "ok", (result, outputs)
    # Its chunks in flight were run again by engine 0; every item is there exactly once.
    said = stream_text(outputs, "stderr")
    assert re.search(r"engine 1 stopped: .*SIGKILL.*run again on the others", said), outputs
    check(cluster, "assert_eq!(survived, (0..600u64).map(|x| x * 3).collect::<Vec<_>>());")
