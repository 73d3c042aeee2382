"""%dashboard in the notebook, through jupyter_client with real engines: a display with an id,
then updates in place whose counts follow a running %pmap, then a frozen snapshot."""

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from conftest import ARTIFACTS, RunningKernel, all_iopub_until_idle, of_type, stream_text


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_dashboard.kernel.log")
    # Dead engines stay dead here: the restart button is for those.
    reply, _ = running.execute("%cluster start -n 2 --no-restart", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute(
        "%%px\nfn slow(x: u64) -> u64 { std::thread::sleep(std::time::Duration::from_millis(10)); x }",
        timeout=300,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


COUNTS = re.compile(
    r"engines (\d+) alive, (\d+) busy, (\d+) dead \| tasks (\d+) queued, (\d+) running, (\d+) done, (\d+) failed"
)


def counts(msg):
    found = COUNTS.search(msg["content"]["data"]["text/plain"])
    assert found, msg["content"]["data"]["text/plain"]
    return tuple(int(g) for g in found.groups())


def test_dashboard_updates_in_place_while_a_map_runs(cluster):
    reply, outputs = cluster.execute("%dashboard")
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = of_type(outputs, "display_data")
    assert len(shown) == 1, outputs
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert display_id.startswith("dashboard-")
    alive, busy, dead, *_ = counts(shown[0])
    assert (alive, dead) == (2, 0)
    assert "<svg" in shown[0]["content"]["data"]["text/html"]

    msg_id = cluster.kc.execute("%pmap -o s slow 0..600u64")
    seen = all_iopub_until_idle(cluster.kc, msg_id)
    updates = [
        m
        for m in of_type(seen, "update_display_data")
        if m["content"]["transient"]["display_id"] == display_id
    ]
    assert len(updates) >= 3, [m["msg_type"] for m in seen]
    series = [counts(m) for m in updates]
    done = [c[5] for c in series]
    assert done == sorted(done) and done[-1] > done[0], series
    # While the map ran, the engines were busy and chunks were running.
    assert any(c[1] > 0 and c[4] > 0 for c in series), series
    # Its rows name the map's function.
    assert any("map slow" in m["content"]["data"]["text/plain"] for m in updates)

    msg_id = cluster.kc.execute("%dashboard --stop")
    seen = all_iopub_until_idle(cluster.kc, msg_id)
    assert "stays as a snapshot" in stream_text(seen)
    # Nothing more after the snapshot.
    time.sleep(1.5)
    late = []
    while True:
        try:
            late.append(cluster.kc.get_iopub_msg(timeout=0.2))
        except Exception:
            break
    frozen = [
        m
        for m in of_type(seen + late, "update_display_data")
        if m["content"]["transient"]["display_id"] == display_id
    ]
    assert len(frozen) == 1 and "(snapshot)" in frozen[0]["content"]["data"]["text/plain"], frozen
    assert counts(frozen[0])[5] >= done[-1]


def test_dashboard_usage_errors(cluster):
    reply, outputs = cluster.execute("%dashboard --frobnicate")
    assert reply["content"]["status"] == "error"
    assert "%dashboard [--stop]" in reply["content"]["evalue"]
    _, outputs = cluster.execute("%dashboard --stop")
    assert "No dashboard is live" in stream_text(outputs)


# The browser dashboard: its HTTP API and event stream, with the same kernel and engines.

URL = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=([0-9a-f]+)")


@pytest.fixture(scope="module")
def web(cluster):
    """The browser page's address and token, from the link %dashboard prints."""
    reply, outputs = cluster.execute("%dashboard")
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = of_type(outputs, "display_data")[0]["content"]["data"]
    found = URL.search(shown["text/plain"])
    assert found, shown["text/plain"]
    assert found.group(0).replace("&", "&amp;") in shown["text/html"]
    cluster.execute("%dashboard --stop")
    return {"base": f"http://127.0.0.1:{found.group(1)}", "token": found.group(2)}


def http(web, path, token=True, method="GET", header=False):
    """(status, body) of one request; the token goes in the query, or in a header."""
    url = web["base"] + path
    headers = {}
    if token is True and header:
        headers["Authorization"] = "token " + web["token"]
    elif token is True:
        url += ("&" if "?" in url else "?") + "token=" + web["token"]
    elif token:
        url += ("&" if "?" in url else "?") + "token=" + token
    request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def api(web, path, **kwargs):
    status, body = http(web, path, **kwargs)
    assert status == 200, (status, body)
    return json.loads(body)


def engine_results(outputs):
    """engine id -> the value in its Out[...] display."""
    return {
        m["content"]["metadata"]["engine"]: m["content"]["data"]["text/plain"].split(": ", 1)[-1]
        for m in of_type(outputs, "display_data")
        if "engine" in m["content"]["metadata"]
    }


def test_without_the_token_the_server_answers_403(web):
    for path in ["/", "/api/state", "/api/tasks", "/api/events", "/api/timeline"]:
        assert http(web, path, token=False)[0] == 403, path
        assert http(web, path, token="0" * len(web["token"]))[0] == 403, path
    assert http(web, "/api/jobs/1/interrupt", token=False, method="POST")[0] == 403
    assert http(web, "/api/engines/0/restart", token=False, method="POST")[0] == 403
    status, page = http(web, "/")
    assert status == 200 and b"<title>Parallax dashboard</title>" in page
    assert api(web, "/api/state", header=True)["cluster"]["engines"] == 2


def test_api_state_counts_engines_and_tasks(cluster, web):
    before = api(web, "/api/state")
    assert [e["id"] for e in before["engines"]] == [0, 1]
    assert all(e["state"] in ("idle", "busy") and e["pid"] > 0 for e in before["engines"])
    assert before["cluster"]["alive"] == 2 and before["cluster"]["dead"] == 0
    reply, _ = cluster.execute("%px let answer = 42;")
    assert reply["content"]["status"] == "ok"
    after = api(web, "/api/state")
    assert after["cluster"]["done"] == before["cluster"]["done"] + 2
    assert after["cluster"]["running"] == 0
    assert [e["done"] for e in after["engines"]] == [e["done"] + 1 for e in before["engines"]]
    # The cell is a job in the history, and its tasks are in the stream.
    job = api(web, "/api/jobs?limit=1")["done"][0]
    assert (job["kind"], job["label"], job["engines"], job["error"]) == ("px", "let answer = 42;", [0, 1], None)
    tasks = api(web, f"/api/tasks?since={before['last_task']}")
    assert tasks["complete"] and sorted(t["engine"] for t in tasks["tasks"]) == [0, 1]
    assert all(t["label"] == "cell" and t["ok"] and t["end"] >= t["start"] for t in tasks["tasks"])


def test_api_follows_a_running_map(cluster, web):
    before = api(web, "/api/state")
    msg_id = cluster.kc.execute("%pmap -o followed slow 0..800u64")
    seen_running = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = api(web, "/api/state")
        maps = [j for j in state["jobs_running"] if j["kind"] == "pmap"]
        if maps:
            seen_running.append((maps[0]["done"], maps[0]["total"], state["cluster"]["running"]))
        elif seen_running:
            break
        time.sleep(0.1)
    all_iopub_until_idle(cluster.kc, msg_id)
    assert seen_running, "the map never showed as running"
    assert any(total == 800 and 0 < done < 800 for done, total, _ in seen_running), seen_running
    assert any(running > 0 for *_, running in seen_running), seen_running
    after = api(web, "/api/state")
    assert after["cluster"]["done"] > before["cluster"]["done"]
    job = api(web, "/api/jobs?limit=1")["done"][0]
    assert (job["kind"], job["label"], job["done"], job["total"], job["error"]) == ("pmap", "map slow", 800, 800, None)
    chunks = api(web, f"/api/tasks?since={before['last_task']}")["tasks"]
    assert {t["engine"] for t in chunks} == {0, 1} and all(t["label"] == "map slow" for t in chunks)
    timeline = api(web, "/api/timeline")
    assert "map slow" in timeline["labels"]
    busy = sum(b["busy"] for lane in timeline["lanes"].values() for b in lane)
    assert busy >= 800 * 0.010 * 0.9, busy


def frames(web, timeout=120):
    """The frames of one event-stream connection, as they come."""
    url = f"{web['base']}/api/events?token={web['token']}"
    with urllib.request.urlopen(url, timeout=timeout) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        event, data = None, []
        while True:
            line = stream.readline().decode()
            if not line:
                return
            line = line.rstrip("\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line == "" and data:
                if event == "frame":
                    yield json.loads("\n".join(data))
                event, data = None, []


def test_event_stream_sends_a_whole_frame_then_what_changes(cluster, web):
    stream = frames(web)
    first = next(stream)
    assert first["state"]["cluster"]["engines"] == 2
    assert first["timeline"]["labels"] and first["jobs"], first.keys()
    last = first["state"]["last_task"]
    assert all(t["seq"] <= last for t in first["tasks"])
    msg_id = cluster.kc.execute('%px println!("from {}", 6 * 7);')
    new_tasks, lines, later = [], [], []
    deadline = time.monotonic() + 120
    for frame in stream:
        later.append(frame)
        new_tasks += [t for t in frame["tasks"] if t["seq"] > last]
        lines += [line for line in frame["output"] if line["text"] == "from 42"]
        # Until the cell's tasks and lines came, the job's end brought the history, and a frame
        # after it came without (a quick cell may fit in one frame).
        seen = len(new_tasks) >= 2 and len(lines) >= 2
        history_since = any("jobs" in f for f in later) and "jobs" not in frame
        if seen and history_since or time.monotonic() > deadline:
            break
    stream.close()
    all_iopub_until_idle(cluster.kc, msg_id)
    # Later frames carry only what is new: each task once.
    seqs = [t["seq"] for f in later for t in f["tasks"]]
    assert len(seqs) == len(set(seqs)) and min(seqs) > last, seqs
    assert sorted(t["engine"] for t in new_tasks) == [0, 1], new_tasks
    assert sorted(line["engine"] for line in lines) == [0, 1], lines
    assert all(line["stream"] == "stdout" for line in lines)
    # The history came once, at first; it comes again only when a job ends.
    assert any("jobs" in f for f in later) and not all("jobs" in f for f in later)


def test_interrupt_button_stops_a_running_map_and_the_cluster_goes_on(cluster, web):
    assert http(web, "/api/jobs/999999/interrupt", method="POST")[0] == 409
    # 20 000 items of 10 ms on 2 engines: 100 s unless interrupted.
    msg_id = cluster.kc.execute("%pmap -o never slow 0..20000u64")
    job = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = [j for j in api(web, "/api/state")["jobs_running"] if j["kind"] == "pmap"]
        if running and running[0]["done"] > 0:
            job = running[0]
            break
        time.sleep(0.1)
    assert job and job["interruptible"], job
    assert api(web, f"/api/jobs/{job['id']}/interrupt", method="POST") == {"interrupted": job["id"]}
    seen = all_iopub_until_idle(cluster.kc, msg_id, timeout=60)
    errors = of_type(seen, "error")
    assert errors and errors[0]["content"]["ename"] == "Interrupted", [m["msg_type"] for m in seen]
    assert "of 20000 items done" in errors[0]["content"]["evalue"]
    ended = api(web, "/api/jobs?limit=5")["done"]
    mine = [j for j in ended if j["id"] == job["id"]]
    assert mine and mine[0]["error"].startswith("Interrupted"), ended
    assert api(web, "/api/state")["jobs_running"] == []
    # Both engines still serve.
    reply, outputs = cluster.execute("%px slow(3) + 1")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert sorted(engine_results(outputs).values()) == ["4", "4"], outputs


def test_restart_button_brings_a_dead_engine_back(cluster, web):
    engines = api(web, "/api/state")["engines"]
    status, body = http(web, "/api/engines/1/restart", method="POST")
    assert status == 409 and b"only a dead engine" in body
    assert http(web, "/api/engines/7/restart", method="POST")[0] == 409
    old_pid = engines[1]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while api(web, "/api/state")["cluster"]["dead"] != 1:
        assert time.monotonic() < deadline, "the kill was not noticed"
        time.sleep(0.1)
    dead = api(web, "/api/state")["engines"][1]
    assert dead["state"] == "dead" and "SIGKILL" in dead["reason"]
    assert api(web, "/api/engines/1/restart", method="POST") == {"restarted": 1}
    state = api(web, "/api/state")
    assert state["cluster"]["alive"] == 2 and state["cluster"]["dead"] == 0
    assert state["engines"][1]["pid"] not in (0, old_pid)
    # The new engine 1 starts empty; both run the next cell.
    reply, outputs = cluster.execute("%px std::env::var(\"PARALLAX_ENGINE_ID\").unwrap()")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert engine_results(outputs) == {0: '"0"', 1: '"1"'}, outputs
    lines = api(web, "/api/output")["lines"]
    assert any(line["engine"] == 1 and line["stream"] == "log" and "started" in line["text"] for line in lines)
