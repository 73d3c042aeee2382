"""Dead engines come back (issue 18): an engine killed with SIGKILL is started again by itself,
with the same id on the same host, its functions, types and dependencies rebuilt from its
history without any cell running again, its variables named as lost; a crash loop is stopped
by the restart limit; `--no-restart` turns it off. Real kernel, real engines."""

import os
import re
import signal
import threading
import time


from conftest import (
    check,
    engine_errors,
    engine_results,
    ok,
    stream_text,
    wait_until,
)

RESTARTS_PER_MINUTE = 3


def status(kernel):
    return stream_text(ok(kernel, "%cluster status"))


def engines(kernel):
    """id -> (pid, state) from `%cluster status`."""
    rows = {}
    # A starting engine's pid is "-" until it registers: it has no row here.
    for row in status(kernel).splitlines()[1:]:
        words = row.split()
        if len(words) >= 4 and words[0].isdigit() and words[1].isdigit():
            rows[int(words[0])] = (int(words[1]), words[3])
    return rows


def kill(pid):
    # pid 0 would be this test's own process group.
    assert pid > 1, pid
    os.kill(pid, signal.SIGKILL)


def values(outputs):
    return {e: text.split(": ", 1)[1] for e, text in engine_results(outputs).items()}


def wait_back(kernel, engine, old_pid, state="idle"):
    """Waits until engine `engine` is a new process that registered (in `state`, if given)."""

    def back():
        pid, now = engines(kernel).get(engine, (old_pid, ""))
        return pid != old_pid and now != "dead" and (state is None or now == state)

    assert wait_until(back, 180, interval=0.2), status(kernel)


def test_a_killed_engine_comes_back_with_its_functions_but_not_its_variables(kernel):
    assert "Started 3 engines" in stream_text(ok(kernel, "%cluster start -n 3", timeout=600))
    ok(kernel, "%%px\nfn triple(x: u64) -> u64 { x * 3 }")
    ok(kernel, "%px let kept = parallax_env::engine_id().unwrap() as u64 * 10;")
    pid = engines(kernel)[1][0]
    # A cell running when the engine dies says what becomes of it.
    outputs = []
    worker = threading.Thread(
        daemon=True,
        target=lambda: kernel.kc.execute_interactive(
            '%px println!("going"); std::thread::sleep(std::time::Duration::from_secs(5));',
            timeout=300,
            output_hook=outputs.append,
        ),
    )
    worker.start()
    assert wait_until(lambda: stream_text(outputs).count("going") >= 3, 120), outputs
    kill(pid)
    worker.join(120)
    died = engine_errors(outputs)[1]
    assert "EngineDied" in died["ename"] and "being restarted" in died["evalue"], died
    assert "variables lost: kept" in died["evalue"], died
    wait_back(kernel, 1, pid)
    # Same id, its function there, its variable not; nothing ran again to get there.
    assert values(ok(kernel, "%px triple(2)")) == {0: "6", 1: "6", 2: "6"}
    _, outputs = kernel.execute("%px kept")
    assert values(outputs) == {0: "0", 2: "20"}, outputs
    assert "kept" in engine_errors(outputs)[1]["evalue"]
    text = status(kernel)
    assert re.search(r"engine 1 .*variables lost: kept", text), text
    # How long a death takes to heal, with nothing running.
    pid = engines(kernel)[2][0]
    kill(pid)
    killed = time.monotonic()
    wait_back(kernel, 2, pid)
    print(f"engine 2 was back and idle {time.monotonic() - killed:.1f} s after SIGKILL")
    assert values(ok(kernel, "%px triple(3)")) == {0: "9", 1: "9", 2: "9"}


def test_a_pmap_across_an_engines_death_carries_on_with_its_replacement(kernel, tmp_path):
    assert "Started 3 engines" in stream_text(ok(kernel, "%cluster start -n 3", timeout=600))
    # Each item says which serving cell (which process) computed it; the first serving cell
    # of each engine id leaves its pid in a file.
    served = tmp_path / "served-1"
    ok(kernel, "%%px --local\nfn slow(x: u64) -> (u64, u32) {\n"
               "    use std::io::Write;\n"
               "    let engine = std::env::var(\"PARALLAX_ENGINE_ID\").unwrap_or_default();\n"
               f'    let mark = format!("{tmp_path}/served-{{engine}}");\n'
               "    if let Ok(mut file) = std::fs::OpenOptions::new().write(true).create_new(true).open(mark) {\n"
               "        let _ = write!(file, \"{}\", std::process::id());\n"
               "    }\n"
               "    std::thread::sleep(std::time::Duration::from_millis(10));\n"
               "    (x * 3, std::process::id())\n}")
    pid = engines(kernel)[1][0]
    done = []
    worker = threading.Thread(
        daemon=True,
        target=lambda: done.append(kernel.execute("%pmap -o tripled slow 0..6000u64", timeout=300)),
    )
    worker.start()
    # Killed once it serves (the map takes about 20 s on 3 engines): its chunks go to the
    # others, and its replacement joins the map once it is back.
    assert wait_until(lambda: served.exists() and served.read_text(), 120)
    kill(pid)
    worker.join(300)
    assert not worker.is_alive()
    reply, outputs = done[0]
    assert reply["content"]["status"] == "ok", outputs
    said = stream_text(outputs, "stderr")
    assert re.search(r"engine 1 stopped: .*SIGKILL", said), said
    assert "engine 1 is back: it serves the map again" in said, said
    check(kernel, "assert!(tripled.iter().map(|r| r.0).eq((0..6000u64).map(|x| x * 3)));")
    # Some items were computed by a serving cell none of the first three was: the replacement's.
    first = {int((tmp_path / f"served-{e}").read_text()) for e in (0, 1, 2)}
    pids = stream_text(ok(kernel, 'println!("{:?}", tripled.iter().map(|r| r.1)'
                                  '.collect::<std::collections::BTreeSet<_>>());'))
    assert {int(p) for p in re.findall(r"\d+", pids)} - first, (pids, first)


def test_a_crash_loop_is_stopped_by_the_restart_limit(kernel):
    assert "Started 1 engine" in stream_text(ok(kernel, "%cluster start -n 1", timeout=600))
    # Killed again as soon as each replacement registers: a crash loop.
    for _ in range(RESTARTS_PER_MINUTE):
        pid = engines(kernel)[0][0]
        kill(pid)
        wait_back(kernel, 0, pid, state=None)
    kill(engines(kernel)[0][0])
    assert wait_until(lambda: engines(kernel)[0][1] == "dead", 60), status(kernel)
    log = re.compile(r"engine 0 .*died 4 times within a minute, so it is not restarted again")
    assert wait_until(lambda: log.search(kernel.log()), 30), kernel.log()[-3000:]
    # It stays dead.
    time.sleep(5)
    assert engines(kernel)[0][1] == "dead", status(kernel)


def test_with_no_restart_a_killed_engine_stays_dead(kernel):
    text = stream_text(ok(kernel, "%cluster start -n 2 --no-restart", timeout=600))
    assert "Started 2 engines" in text, text
    pid = engines(kernel)[1][0]
    kill(pid)
    assert wait_until(lambda: engines(kernel)[1][1] == "dead", 60), status(kernel)
    # A restart here takes a few seconds (see the first test): it would have begun by now.
    time.sleep(5)
    assert engines(kernel)[1][1] == "dead", status(kernel)
    assert "restarting dead engines is off" in kernel.log()
    assert values(ok(kernel, "%px 40 + 2")) == {0: "42"}
