"""Shared set-up for the integration tests: one release build of `parallax`, a kernelspec for it
in a private Jupyter path, and helpers to start real kernels through jupyter_client."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


def parallax_binary() -> Path:
    explicit = os.environ.get("PARALLAX_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/parallax/target"))
    return Path(target) / "release" / "parallax"


@pytest.fixture(scope="session", autouse=True)
def kernelspec():
    """Installs the kernelspec into a private data dir and points Jupyter at it, so the tests
    never touch the user's own Jupyter set-up."""
    binary = parallax_binary()
    assert binary.exists(), f"build the kernel first: {binary} is missing"
    prefix = Path(tempfile.mkdtemp(prefix="parallax-jupyter-"))
    subprocess.run([str(binary), "install", "--prefix", str(prefix)], check=True)
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    os.environ["JUPYTER_DATA_DIR"] = str(prefix / "data")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(prefix / "runtime")
    os.environ["JUPYTER_CONFIG_DIR"] = str(prefix / "config")
    # Each kernel would warm a standby engine of its own (seconds of both cores): only the
    # tests of the standby engine, which set it, have one.
    os.environ["PARALLAX_STANDBY"] = "0"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield prefix
    shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture
def private_dirs(tmp_path):
    """The kernel's and engines' temporary and shared-memory directories, so that what is left
    in them is what they leaked."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    shared = Path(tempfile.mkdtemp(prefix="parallax-test-", dir="/dev/shm"))
    yield temporary, shared
    shutil.rmtree(shared, ignore_errors=True)


class RunningKernel:
    """A real kernel process, its client, and its log (the kernel's stderr)."""

    def __init__(self, log_path: Path, env: dict = None):
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.km = KernelManager(kernel_name="parallax")
        extra = {"env": {**os.environ, **env}} if env else {}
        self.km.start_kernel(stderr=self.log_file, **extra)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def execute(self, code: str, timeout: float = 120, **kwargs):
        """Runs a cell; returns (reply, outputs) where outputs are the IOPub messages between
        busy and idle that belong to it."""
        outputs = []
        reply = self.kc.execute_interactive(
            code, timeout=timeout, output_hook=outputs.append, **kwargs
        )
        return reply, outputs

    def stop(self):
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=False)
        finally:
            # Its connection file (with the key) goes too, also when the kernel was killed.
            self.km.cleanup_resources()
            self.log_file.close()


def stream_text(outputs, name="stdout") -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == name
    )


def engine_results(outputs):
    """engine id -> text/plain of its Out[...] display."""
    found = {}
    for m in of_type(outputs, "display_data"):
        meta = m["content"]["metadata"]
        if "engine" in meta:
            found[meta["engine"]] = m["content"]["data"]["text/plain"]
    return found


def engine_errors(outputs):
    """engine id -> the content of its `[N:Name]` error."""
    return {
        int(re.match(r"\[(\d+):", m["content"]["ename"]).group(1)): m["content"]
        for m in of_type(outputs, "error")
        if re.match(r"\[\d+:", m["content"]["ename"])
    }


def of_type(outputs, msg_type):
    return [m for m in outputs if m["msg_type"] == msg_type]


@pytest.fixture
def kernel(request, kernelspec):
    log = ARTIFACTS / f"{request.node.name}.kernel.log"
    running = RunningKernel(log)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shared_kernel(request, kernelspec):
    log = ARTIFACTS / f"{request.module.__name__}.kernel.log"
    running = RunningKernel(log)
    yield running
    running.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def interrupt_and_wait(kernel, worker, limit: float = 10) -> float:
    """Interrupts the kernel while `worker` runs a cell; returns the seconds until the cell
    ended. Fails if it did not end within `limit`."""
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    worker.join(limit)
    elapsed = time.monotonic() - t0
    assert not worker.is_alive(), "the cell did not end after the interrupt"
    return elapsed


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


def ok(kernel, code, timeout=300):
    """Runs a cell that must succeed; returns its outputs."""
    reply, outputs = kernel.execute(code, timeout=timeout)
    assert reply["content"]["status"] == "ok", (code, reply["content"], outputs)
    return outputs


def check(kernel, rust):
    """Runs Rust in the notebook that prints `verified` only if its assertions hold."""
    outputs = ok(kernel, rust + '\nprintln!("verified");')
    assert "verified" in stream_text(outputs), outputs


def alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid):
    """The children of every thread of `pid` (tokio's worker threads start processes too)."""
    found = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as listing:
                found += [int(p) for p in listing.read().split()]
        except OSError:
            pass
    return found


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def identity(pid):
    """(pid, start time), so that a pid used again is not taken for the same process; None
    once the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def assert_nothing_left(processes, temporary, shared, within):
    """Every process of `processes` (identities) has ended (given `within` seconds), and the
    private temporary and shared-memory directories are empty."""
    def left():
        return [p for p, start in processes if identity(p) == (p, start)]

    assert wait_until(lambda: not left(), within), [
        Path(f"/proc/{p}/cmdline").read_bytes() for p in left()
    ]
    assert not list(temporary.iterdir()), sorted(temporary.rglob("*"))[:20]
    assert not list(shared.iterdir()), sorted(shared.rglob("*"))[:20]


def environment_has(pid, name):
    prefix = f"{name}=".encode()
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(entry.startswith(prefix) for entry in entries)


def store_processes(engine_pid):
    """The processes of an engine's store: its supervisor (the store as its engine sees it),
    the holder of its variables, and the fork running a cell if one runs."""
    under = descendants(engine_pid)
    supervisors = [p for p in under if environment_has(p, "PARALLAX_STORE")
                   and not environment_has(p, "PARALLAX_STORE_HOLDER")]
    holders = [p for p in under if environment_has(p, "PARALLAX_STORE_HOLDER")]
    forks = [p for p in holders if any(p in children(h) for h in holders)]
    return {
        "supervisor": supervisors,
        "holder": [p for p in holders if p not in forks],
        "fork": forks,
    }
