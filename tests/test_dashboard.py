"""%dashboard in the notebook, through jupyter_client with real engines: a display with an id,
then updates in place whose counts follow a running %pmap, then a frozen snapshot."""

import re
import time

import pytest

from conftest import ARTIFACTS, RunningKernel, of_type, stream_text


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_dashboard.kernel.log")
    reply, _ = running.execute("%cluster start -n 2", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute(
        "%%px\nfn slow(x: u64) -> u64 { std::thread::sleep(std::time::Duration::from_millis(10)); x }",
        timeout=300,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


def all_iopub_until_idle(kc, msg_id, timeout=300):
    """Every IOPub message until the request `msg_id` is idle, whatever its parent."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=deadline - time.monotonic())
        seen.append(msg)
        if (
            msg["msg_type"] == "status"
            and msg["parent_header"].get("msg_id") == msg_id
            and msg["content"]["execution_state"] == "idle"
        ):
            return seen
    raise AssertionError("the cell did not end")


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
