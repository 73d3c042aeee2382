"""The standby engine, through jupyter_client: a kernel warms one engine process on its host
while idle, the next `%cluster start` adopts it as its first engine (with its id and the
pool's size), and `%cluster stop` has a new one warm up."""

import os
import re
import signal

import pytest

from conftest import (
    assert_nothing_left,
    ARTIFACTS,
    RunningKernel,
    alive,
    descendants,
    engine_results,
    identity,
    ok,
    stream_text,
    wait_until,
)


@pytest.fixture
def kernel(request, kernelspec):
    running = RunningKernel(
        ARTIFACTS / f"{request.node.name}.kernel.log", env={"PARALLAX_STANDBY": "1"}
    )
    yield running
    running.stop()


def standby_pid(kernel):
    """The kernel's standby engine process, once there is one."""
    found = []

    def look():
        found.clear()
        for pid in descendants(kernel.km.provisioner.process.pid):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"--standby" in argv and alive(pid):
                found.append(pid)
        return len(found) == 1

    assert wait_until(look, timeout=120), "no standby engine started"
    return found[0]


def engine_pids(kernel):
    status = stream_text(ok(kernel, "%cluster status"))
    return {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+\S+\s+idle", status, re.M)
    }


def test_the_next_pool_adopts_the_standby_engine_and_stop_warms_another(kernel):
    ok(kernel, "1")
    waiting = standby_pid(kernel)
    text = stream_text(ok(kernel, "%cluster start -n 3", timeout=600))
    assert "Started 3 engines" in text, text
    pids = engine_pids(kernel)
    assert pids[0] == waiting, (pids, waiting)
    seen = engine_results(
        ok(kernel, "%px (parallax_env::engine_id(), parallax_env::engines())")
    )
    assert {e: t.split(": ", 1)[1] for e, t in seen.items()} == {
        i: f"(Some({i}), Some(3))" for i in range(3)
    }
    status = stream_text(ok(kernel, "%cluster status"))
    assert "engines 0, 1, 2 on" in status and "engine 0 compiles them" in status, status
    ok(kernel, "%px let cubed = 3u64.pow(3);")
    assert {
        e: t.split(": ", 1)[1] for e, t in engine_results(ok(kernel, "%px cubed")).items()
    } == {i: "27" for i in range(3)}
    ok(kernel, "%cluster stop")
    assert wait_until(lambda: not alive(waiting), timeout=30)
    assert standby_pid(kernel) != waiting


def test_a_standby_engine_that_died_is_not_adopted(kernel):
    ok(kernel, "1")
    waiting = standby_pid(kernel)
    os.kill(waiting, signal.SIGKILL)
    assert wait_until(lambda: not alive(waiting), timeout=30)
    text = stream_text(ok(kernel, "%cluster start -n 2", timeout=600))
    assert "Started 2 engines" in text, text
    assert waiting not in engine_pids(kernel).values()
    seen = engine_results(ok(kernel, "%px parallax_env::engines()"))
    assert {e: t.split(": ", 1)[1] for e, t in seen.items()} == {0: "Some(2)", 1: "Some(2)"}


@pytest.mark.parametrize("ending", ["shutdown_request", "SIGTERM"])
def test_a_kernel_ended_as_its_standby_warms_up_leaves_nothing(
    request, kernelspec, private_dirs, ending
):
    """As a notebook run by nbconvert ends: its last cell stops the pool, which has a new
    standby engine warm up, and the kernel is asked to shut down (or, slow to, is sent SIGTERM
    with its process group, as jupyter_client does)."""
    temporary, shared = private_dirs
    running = RunningKernel(
        ARTIFACTS / f"{request.node.name}.kernel.log",
        env={"PARALLAX_STANDBY": "1", "TMPDIR": str(temporary), "PARALLAX_SHM_DIR": str(shared)},
    )
    try:
        # The notebook's own context is built, as it is by a notebook's last cell.
        ok(running, "1")
        ok(running, "%cluster start -n 2", timeout=600)
        ok(running, "%px 1 + 1")
        ok(running, "%cluster stop")
        standby_pid(running)
        kernel_pid = running.km.provisioner.pid
        processes = {identity(p) for p in [kernel_pid, *descendants(kernel_pid)]} - {None}
        if ending == "SIGTERM":
            # jupyter_client starts a kernel in a session of its own: the group is not ours.
            assert os.getpgid(kernel_pid) == kernel_pid != os.getpgid(0)
            os.killpg(kernel_pid, signal.SIGTERM)
        else:
            running.km.request_shutdown()
        assert wait_until(lambda: not running.km.is_alive(), 30), "the kernel did not end"
    finally:
        running.log_file.close()
        running.kc.stop_channels()
        running.km.cleanup_resources()

    assert_nothing_left(processes, temporary, shared, within=10)
