"""The engine pool and %px through jupyter_client, with real engine processes."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    ARTIFACTS,
    RunningKernel,
    alive,
    descendants,
    engine_errors,
    engine_results,
    interrupt_and_wait,
    of_type,
    stream_text,
    wait_until,
)

ID_FN = 'fn id() -> u32 { std::env::var("PARALLAX_ENGINE_ID").unwrap().parse().unwrap() }'


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_px.kernel.log")
    reply, outputs = running.execute("%cluster start -n 3", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert re.search(r"Started 3 engines in [\d.]+ s \(ids 0, 1, 2\)", stream_text(outputs))
    reply, _ = running.execute("%%px\n" + ID_FN)
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


results = engine_results


def is_progress(msg):
    """A slow cell's progress block, shown besides the engines' outputs."""
    return msg["content"].get("transient", {}).get("display_id", "").startswith("px-progress-")


def test_engines_have_their_id_and_count_in_the_environment(cluster):
    _, outputs = cluster.execute(
        '%px println!("{} of {}", std::env::var("PARALLAX_ENGINE_ID").unwrap(), '
        'std::env::var("PARALLAX_ENGINES").unwrap());'
    )
    text = stream_text(outputs)
    for i in range(3):
        assert f"[stdout:{i}] {i} of 3\n" in text, text
    # The same through the helper crate, with no :dep line.
    _, outputs = cluster.execute("%px (parallax_env::engine_id(), parallax_env::engines())")
    assert {k: v.split(": ", 1)[1] for k, v in results(outputs).items()} == {
        i: f"(Some({i}), Some(3))" for i in range(3)
    }


def test_per_engine_outputs_prefixes_and_state(cluster):
    reply, outputs = cluster.execute(
        '%%px\nlet v = id() * 10;\nprintln!("out {}", v);\neprintln!("err {}", id());'
    )
    assert reply["content"]["status"] == "ok"
    out, err = stream_text(outputs), stream_text(outputs, "stderr")
    for i in range(3):
        assert f"[stdout:{i}] out {i * 10}\n" in out
        assert f"[stderr:{i}] err {i}\n" in err
    # Each engine kept its own `v`.
    _, outputs = cluster.execute("%px v + 1")
    got = results(outputs)
    assert set(got) == {0, 1, 2}
    for i in range(3):
        assert re.fullmatch(rf"Out\[{i}:\d+\]: {i * 10 + 1}", got[i]), got


def test_targets_subsets(cluster):
    for targets, expected in [("0,2", {0, 2}), ("1:3", {1, 2}), ("::2", {0, 2}), ("1", {1}), ("all", {0, 1, 2})]:
        _, outputs = cluster.execute(f"%px --targets {targets} id()")
        assert set(results(outputs)) == expected, targets
    _, outputs = cluster.execute("%px -t 2 id()")
    assert set(results(outputs)) == {2}
    reply, _ = cluster.execute("%px --targets 7 id()")
    assert reply["content"]["status"] == "error"
    assert "no engine with id 7" in reply["content"]["evalue"]


def test_noblock_then_pxresult(cluster):
    t0 = time.monotonic()
    reply, outputs = cluster.execute(
        '%%px --noblock\nstd::thread::sleep(std::time::Duration::from_millis(1500));\n'
        'println!("late {}", id());\nid() + 100'
    )
    assert reply["content"]["status"] == "ok"
    assert "%pxresult" in stream_text(outputs)
    assert not results(outputs)
    assert time.monotonic() - t0 < 1.5, "--noblock waited for the engines"
    reply, outputs = cluster.execute("%pxresult")
    assert reply["content"]["status"] == "ok"
    text = stream_text(outputs)
    for i in range(3):
        assert f"[stdout:{i}] late {i}\n" in text
    assert {k: v.split(": ")[1] for k, v in results(outputs).items()} == {0: "100", 1: "101", 2: "102"}


def test_autopx_on_and_off(cluster):
    reply, outputs = cluster.execute("%autopx")
    assert "on" in stream_text(outputs)
    _, outputs = cluster.execute('println!("auto {}", id());')
    text = stream_text(outputs)
    assert all(f"[stdout:{i}] auto {i}" in text for i in range(3)), text
    _, outputs = cluster.execute("%autopx")
    assert "off" in stream_text(outputs)
    _, outputs = cluster.execute('println!("local again");')
    assert stream_text(outputs) == "local again\n"


def test_error_on_one_engine_others_succeed(cluster):
    reply, outputs = cluster.execute('%%px\nif id() == 1 { panic!("boom on one"); }\nid() * 2')
    assert reply["content"]["status"] == "error"
    assert "1 of 3 engines failed: engine 1 (panic)" in reply["content"]["evalue"]
    errors = engine_errors(outputs)
    assert set(errors) == {1}
    assert errors[1]["evalue"] == "boom on one"
    assert {k: v.split(": ")[1] for k, v in results(outputs).items()} == {0: "0", 2: "4"}
    # A compile error is shown per engine, in full.
    reply, outputs = cluster.execute('%px --targets 0 let x: u8 = "no";')
    errors = engine_errors(outputs)
    assert "error[E0308]" in "\n".join(errors[0]["traceback"])


def test_timeout_stops_only_the_slow_engine(cluster):
    t0 = time.monotonic()
    reply, outputs = cluster.execute(
        "%%px --timeout 3\n"
        "if id() == 1 { loop { std::thread::sleep(std::time::Duration::from_millis(10)); } }\n"
        'println!("finished {}", id());'
    )
    elapsed = time.monotonic() - t0
    assert reply["content"]["status"] == "error"
    text = stream_text(outputs)
    assert "[stdout:0] finished 0" in text and "[stdout:2] finished 2" in text
    errors = engine_errors(outputs)
    assert set(errors) == {1}
    assert "[1:Timeout]" == errors[1]["ename"]
    assert elapsed < 15, elapsed
    # The stopped engine takes cells again.
    _, outputs = cluster.execute("%px --targets 1 id()")
    assert results(outputs)[1].endswith(": 1")


def test_interrupt_during_long_px(cluster):
    started = threading.Event()
    result = {}

    spinning = set()

    def hook(msg):
        # Every engine in its loop: an engine interrupted before its cell began says that
        # nothing was lost, which is not what this test is about.
        if msg["msg_type"] == "stream":
            spinning.update(int(n) for n in re.findall(r"\[stdout:(\d+)\] spinning", msg["content"].get("text", "")))
            if spinning >= {0, 1, 2}:
                started.set()

    code = '%%px\nlet keep = 5;\nprintln!("spinning");\nloop { std::thread::sleep(std::time::Duration::from_millis(10)); }'
    outputs = []

    def run():
        result["reply"] = cluster.kc.execute_interactive(
            code, timeout=120, output_hook=lambda m: (outputs.append(m), hook(m))
        )

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert started.wait(120)
    time.sleep(0.5)  # let every engine reach its loop
    elapsed = interrupt_and_wait(cluster, worker)
    print(f"the interrupt ended the cell on 3 engines in {elapsed:.2f} s")
    errors = engine_errors(outputs)
    assert set(errors) == {0, 1, 2}
    for content in errors.values():
        assert "Interrupted" in content["ename"]
        assert "nothing was lost" in content["evalue"], content
    _, outputs = cluster.execute("%px id()")
    assert set(results(outputs)) == {0, 1, 2}, engine_errors(outputs)


def test_magic_errors_print_usage(cluster):
    for code in [
        "%px",
        "%px --bogus 1",
        "%px --targets",
        "%px --timeout never 1",
        "%px --group-outputs colour 1",
        "%%px let a = 1;\nb",
        "%pxresult now",
        "%autopx please",
        "%pxconfig --targets 0 extra",
        "%cluster",
        "%cluster start -n zero",
        "%cluster launch",
        "%cluster add",
    ]:
        reply, _ = cluster.execute(code)
        content = reply["content"]
        assert content["status"] == "error", code
        assert content["ename"] == "UsageError", code
        assert "Usage: %" in content["evalue"], (code, content["evalue"])


def test_group_outputs_engine_and_type(cluster):
    code = '%%px --group-outputs {}\nprintln!("a{{}}", id());\neprintln!("e{{}}", id());\nprintln!("b{{}}", id());\nid()'
    _, outputs = cluster.execute(code.format("engine"))
    order = [
        (m["content"].get("metadata", {}).get("engine"), m["msg_type"], m["content"].get("text", ""))
        for m in outputs
        if m["msg_type"] in ("stream", "display_data") and not is_progress(m)
    ]
    engines_in_order = [re.search(r"\[\w+:(\d+)\]", t).group(1) if t else str(e) for e, _, t in order]
    # All of one engine's outputs come before the next engine's.
    assert engines_in_order == sorted(engines_in_order), order
    _, outputs = cluster.execute(code.format("type"))
    kinds = [
        "stdout" if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        else "stderr" if m["msg_type"] == "stream"
        else "result"
        for m in outputs
        if m["msg_type"] in ("stream", "display_data") and not is_progress(m)
    ]
    assert kinds == sorted(kinds, key=["stdout", "stderr", "result"].index), kinds


def test_local_runs_in_the_notebook_too(cluster):
    reply, outputs = cluster.execute('%px --local --targets 0 let both = 21;')
    assert reply["content"]["status"] == "ok"
    _, outputs = cluster.execute("both * 2")
    assert of_type(outputs, "execute_result")[0]["content"]["data"]["text/plain"] == "42"
    _, outputs = cluster.execute("%px --targets 0 both * 2")
    assert results(outputs)[0].endswith(": 42")


def test_pxconfig_sets_defaults(cluster):
    _, outputs = cluster.execute("%pxconfig --targets 1")
    assert "--targets 1" in stream_text(outputs)
    _, outputs = cluster.execute("%px id()")
    assert set(results(outputs)) == {1}
    _, outputs = cluster.execute("%pxconfig --targets all")
    _, outputs = cluster.execute("%px id()")
    assert set(results(outputs)) == {0, 1, 2}


def test_rich_output_from_engines_carries_the_engine_id(cluster):
    _, outputs = cluster.execute(
        '%px --targets 0,2 println!("EVCXR_BEGIN_CONTENT text/html\\n<i>engine {}</i>\\nEVCXR_END_CONTENT", id());'
    )
    html = {
        m["content"]["metadata"]["engine"]: m["content"]["data"]["text/html"]
        for m in of_type(outputs, "display_data")
        if "text/html" in m["content"]["data"] and "engine" in m["content"]["metadata"]
    }
    assert html == {0: "<i>engine 0</i>", 2: "<i>engine 2</i>"}


def test_a_cell_with_a_dep_runs_on_every_engine(cluster):
    # The engines share one build of the dependency: tests/test_compile_once.py counts it.
    reply, outputs = cluster.execute(
        '%%px\n:dep itoa = "1"\nlet mut buffer = itoa::Buffer::new();\nbuffer.format(id() * 7).to_string()',
        timeout=600,
    )
    assert reply["content"]["status"] == "ok", (reply["content"], engine_errors(outputs))
    assert {k: v.split(": ")[1] for k, v in results(outputs).items()} == {
        0: '"0"',
        1: '"7"',
        2: '"14"',
    }


def test_a_long_cell_shows_which_engines_are_done(cluster):
    sleep = "std::thread::sleep(std::time::Duration::from_millis(600 + 1500 * id() as u64));"
    reply, outputs = cluster.execute(f"%px --targets 0,1,2 --progress-after 0.3 {sleep}")
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = [m for m in of_type(outputs, "display_data") if is_progress(m)]
    assert len(shown) == 1, outputs
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [
        m["content"]["data"]["text/plain"]
        for m in of_type(outputs, "update_display_data")
        if m["content"]["transient"]["display_id"] == display_id
    ]
    texts = [shown[0]["content"]["data"]["text/plain"]] + updates
    # Engines finish one after another, and the block says so as they do.
    assert any("1 of 3 engines done" in t and "engine 2: running" in t for t in texts), texts
    assert any("2 of 3 engines done" in t for t in texts), texts
    assert texts[-1].startswith("%px: 3 of 3 engines done") and "engine 0: done in" in texts[-1], texts
    # -1: never; and a short cell shows none by default.
    _, outputs = cluster.execute(f"%px --targets 0,1 --progress-after -1 {sleep}")
    assert not [m for m in outputs if is_progress(m)], outputs
    _, outputs = cluster.execute("%px 1 + 1")
    assert not [m for m in outputs if is_progress(m)], outputs


def test_cluster_ping_times_the_control_path(cluster):
    reply, outputs = cluster.execute("%cluster ping -n 50")
    assert reply["content"]["status"] == "ok", reply["content"]
    said = stream_text(outputs)
    found = re.search(
        r"Round trip to (\d+) engines .*, 50 times: median ([\d.]+) ms, min ([\d.]+) ms, 95th percentile ([\d.]+) ms",
        said,
    )
    assert found, said
    median, low, high = (float(found.group(i)) for i in (2, 3, 4))
    assert int(found.group(1)) == 3 and 0 < low <= median <= high, said
    reply, _ = cluster.execute("%cluster ping -n 0")
    assert reply["content"]["status"] == "error" and "ping [-n COUNT]" in reply["content"]["evalue"]


def test_sigkill_of_one_engine_mid_cell(cluster):
    _, outputs = cluster.execute('%px println!("pid {}", std::process::id());')
    # The cell runs in evcxr's evaluation process; its parent is the engine process.
    cluster.execute("%cluster status")
    _, status_out = cluster.execute("%cluster status")
    # The engine table, without the section on compiled cells below it.
    rows = [r.split() for r in stream_text(status_out).splitlines()[1:] if r[:6].strip().isdigit()]
    engine_pid = {int(r[0]): int(r[1]) for r in rows}
    seen = {}

    def hook(msg):
        if msg["msg_type"] == "error":
            seen.setdefault(msg["content"]["ename"], time.monotonic())
        if msg["msg_type"] == "stream" and "working" in msg["content"].get("text", ""):
            seen.setdefault("working", time.monotonic())

    code = (
        '%%px\nprintln!("working");\n'
        "std::thread::sleep(std::time::Duration::from_secs(if id() == 1 { 30 } else { 4 }));\n"
        'println!("survived {}", id());'
    )
    outputs = []
    result = {}
    worker = threading.Thread(
        daemon=True,
        target=lambda: result.setdefault(
            "reply",
            cluster.kc.execute_interactive(
                code, timeout=120, output_hook=lambda m: (outputs.append(m), hook(m))
            ),
        )
    )
    worker.start()
    assert wait_until(lambda: "working" in seen, 60)
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(engine_pid[1], signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive()
    assert "[1:EngineDied]" in seen
    print(f"engine 1's death was named {seen['[1:EngineDied]'] - killed_at:.2f} s after SIGKILL")
    text = stream_text(outputs)
    assert "[stdout:0] survived 0" in text and "[stdout:2] survived 2" in text
    errors = engine_errors(outputs)
    assert "killed by signal 9 (SIGKILL)" in errors[1]["evalue"]
    assert "being restarted" in errors[1]["evalue"], errors[1]
    # It comes back by itself, a new process with the same id, and the pool goes on with it.
    def back():
        _, status_out = cluster.execute("%cluster status")
        row = re.search(r"^\s*1\s+(\d+)\s+\S+\s+idle", stream_text(status_out), re.M)
        return row and int(row.group(1)) != engine_pid[1]
    assert wait_until(back, 180, interval=0.5)
    _, outputs = cluster.execute("%px id()")
    assert set(results(outputs)) == {0, 1, 2}, engine_errors(outputs)


def test_sigkilled_kernel_leaves_no_engine_behind(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_px_sigkill.kernel.log")
    try:
        reply, _ = running.execute("%cluster start -n 1", timeout=600)
        assert reply["content"]["status"] == "ok"
        reply, _ = running.execute("%cluster start", timeout=600)
        assert "already running" in reply["content"]["evalue"]
        reply, outputs = running.execute("%cluster add -n 1", timeout=600)
        assert "Started 1 engines" in stream_text(outputs) and "(ids 1)" in stream_text(outputs)
        reply, outputs = running.execute("%cluster stop")
        assert "Stopped 2 engines" in stream_text(outputs)
        reply, _ = running.execute("%px 1")
        assert reply["content"]["ename"] == "NoEngines"
        reply, outputs = running.execute("%cluster start -n 1", timeout=600)
        reply, outputs = running.execute("%cluster restart", timeout=600)
        assert "Stopped 1 engines" in stream_text(outputs)
        reply, outputs = running.execute("%cluster add -n 1", timeout=600)
        _, outputs = running.execute('%px std::env::var("PARALLAX_ENGINE_ID").unwrap()')
        assert sorted(results(outputs)) == [0, 1]
        running.execute(
            "%px --noblock loop { std::thread::sleep(std::time::Duration::from_millis(10)); }"
        )
        time.sleep(2)
        kernel_pid = running.km.provisioner.pid
        procs = descendants(kernel_pid)
        assert len(procs) >= 4, procs  # 2 engines and their evaluation processes, at least
        os.kill(kernel_pid, signal.SIGKILL)
        assert wait_until(lambda: not any(alive(p) for p in procs), 10), [
            p for p in procs if alive(p)
        ]
    finally:
        running.log_file.close()
        running.kc.stop_channels()



LAUNCHER = """
import sys, time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name="parallax")
# In the test's own directory: killed, this launcher cannot remove it.
km.connection_file = sys.argv[1]
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
reply = kc.execute_interactive("%cluster start -n 1", timeout=600, output_hook=lambda msg: None)
assert reply["content"]["status"] == "ok", reply["content"]
print(km.provisioner.pid, flush=True)
time.sleep(600)
"""


def test_a_kernel_whose_launcher_dies_shuts_down_with_its_engines(kernelspec, tmp_path):
    # The launcher starts a kernel with an engine, then is SIGKILLed: it never shuts it down.
    connection_file = str(tmp_path / "kernel.json")
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, connection_file], stdout=subprocess.PIPE, text=True
    )
    try:
        kernel_pid = int(launcher.stdout.readline())
        procs = [kernel_pid] + descendants(kernel_pid)
        assert len(procs) >= 3, procs  # the kernel, its engine and the engine's evaluation
    finally:
        launcher.kill()
        launcher.wait()
    assert wait_until(lambda: not any(alive(p) for p in procs), 15), [p for p in procs if alive(p)]


def test_shutdown_stops_the_engines(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_px_shutdown.kernel.log")
    reply, _ = running.execute("%cluster start -n 1", timeout=600)
    assert reply["content"]["status"] == "ok"
    kernel_pid = running.km.provisioner.pid
    procs = descendants(kernel_pid)
    assert procs
    running.stop()  # a shutdown_request, as a frontend sends it
    assert wait_until(lambda: not any(alive(p) for p in procs), 10), [p for p in procs if alive(p)]
    assert "engine 0 stopped" in running.log_path.read_text()

