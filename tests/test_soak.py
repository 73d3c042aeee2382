"""The soak (issue 18): `%pmap` and `%px` cells, one after another, while a chaos loop SIGKILLs a
random engine or a random engine's store every 20-40 s. Every map's result must be complete and
correct, every `%px` cell must either succeed or name the engine that died, no process,
temporary file or shared memory may be left once the kernel stops, and the kernel's memory must
stay flat. It runs for PARALLAX_SOAK_SECONDS (120 in `.ci/run`; `bench/soak.sh` runs it for 600) and prints its counts.
"""

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    assert_nothing_left,
    ARTIFACTS,
    RunningKernel,
    children,
    descendants,
    engine_errors,
    engine_results,
    identity,
    of_type,
    ok,
    store_processes,
    stream_text,
    wait_until,
)

SECONDS = float(os.environ.get("PARALLAX_SOAK_SECONDS", "120"))
ITEMS = 20_000
ENGINES = 3


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Chaos:
    """Kills a random engine, or a random engine's store (its supervisor, the process holding
    its variables, or the fork running its cell), every 20-40 s until stopped. Finds them in
    /proc under the kernel."""

    def __init__(self, kernel_pid, seed):
        self.kernel_pid = kernel_pid
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.kills = []

    def engines(self):
        # The kernel's children that run `parallax engine`.
        found = []
        for pid in children(self.kernel_pid):
            try:
                if b"engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    def run(self):
        while not self.stop.wait(self.random.uniform(20, 40)):
            engines = self.engines()
            if not engines:
                continue
            engine = self.random.choice(engines)
            stores = [p for ps in store_processes(engine).values() for p in ps]
            if stores and self.random.random() < 0.5:
                victim, what = self.random.choice(stores), "store"
            else:
                victim, what = engine, "engine"
            try:
                os.kill(victim, signal.SIGKILL)
                self.kills.append((round(time.monotonic()), what, victim))
            except ProcessLookupError:
                pass


def run_maps_and_cells(kernel, seconds, processes):
    """%pmap then %px, over and over (at least once): every map complete and correct; a %px
    cell either gives the right value or names its engine and what befell it. Returns the
    counts and the kernel's memory after each round; adds every process seen under the kernel
    to `processes`."""
    counts = {"maps": 0, "cells": 0, "engine errors": 0}
    memory = []
    kernel_pid = kernel.km.provisioner.pid
    ended = time.monotonic() + seconds
    while not memory or time.monotonic() < ended:
        ok(kernel, f"%pmap -o out work 0..{ITEMS}u64", timeout=600)
        check = ok(kernel, f"out == (0..{ITEMS}u64).map(work).collect::<Vec<_>>()")
        assert of_type(check, "execute_result")[0]["content"]["data"]["text/plain"] == "true"
        counts["maps"] += 1
        _, outputs = kernel.execute("%px work(3)", timeout=600)
        counts["cells"] += 1
        for engine, error in engine_errors(outputs).items():
            said = error["ename"] + ": " + error["evalue"]
            assert error["ename"].startswith(f"[{engine}:"), said
            assert re.search(r"died|killed|SIGKILL|rolled back", said), said
            counts["engine errors"] += 1
        for engine, text in engine_results(outputs).items():
            assert text.endswith(": 7"), (engine, text)
        memory.append(rss_mib(kernel_pid))
        processes.update(identity(p) for p in descendants(kernel_pid))
    processes.discard(None)
    return counts, memory


def test_maps_and_cells_survive_engines_and_stores_killed_at_random(kernelspec, private_dirs):
    temporary, shared = private_dirs
    env = {"TMPDIR": str(temporary), "PARALLAX_SHM_DIR": str(shared)}
    kernel = RunningKernel(ARTIFACTS / "test_soak.kernel.log", env=env)
    try:
        text = stream_text(ok(kernel, f"%cluster start -n {ENGINES}", timeout=600))
        assert f"Started {ENGINES} engines" in text, text
        ok(kernel, "%%px --local\nfn work(x: u64) -> u64 { x * 2 + 1 }")
        # A first round builds what every round then takes from the cell cache.
        processes = set()
        run_maps_and_cells(kernel, 0, processes)
        kernel_pid = kernel.km.provisioner.pid
        memory_before = rss_mib(kernel_pid)
        chaos = Chaos(kernel_pid, seed=int(os.environ.get("PARALLAX_SOAK_SEED", "18")))
        chaos_thread = threading.Thread(target=chaos.run, daemon=True)
        chaos_thread.start()
        try:
            counts, memory = run_maps_and_cells(kernel, SECONDS, processes)
        finally:
            chaos.stop.set()
            chaos_thread.join(60)
        processes.update(identity(p) for p in descendants(kernel_pid))
        processes.discard(None)
        ok(kernel, "%cluster stop", timeout=300)
        revivals = len(re.findall(r"engine \d+ is back", kernel.log()))
    finally:
        kernel.stop()
    summary = (
        f"soak of {SECONDS:.0f} s: {counts['maps']} maps of {ITEMS} items and "
        f"{counts['cells']} %px cells on {ENGINES} engines, {counts['engine errors']} engine "
        f"errors, each naming its engine's death; killed {len(chaos.kills)} times: "
        f"{[what for _, what, _ in chaos.kills].count('engine')} engines, "
        f"{[what for _, what, _ in chaos.kills].count('store')} stores; {revivals} engines "
        f"came back; {len(processes)} processes seen under the kernel, none left; kernel memory "
        f"{memory_before:.1f} MiB before, {min(memory):.1f}-{max(memory):.1f} during, "
        f"{memory[-1]:.1f} at the end"
    )
    # Shown with -s (bench/soak.sh), and kept beside the logs of a run that captures output.
    print("\n" + summary)
    (ARTIFACTS / "soak.txt").write_text(summary + "\n")
    assert chaos.kills, "nothing was killed: the soak was too short"
    # Whatever the kernel and its engines started, killed or not, has ended (given a moment).
    assert_nothing_left(processes, temporary, shared, within=30)
    # Flat: the last round's memory is within what the first rounds took, give or take.
    assert memory[-1] - max(memory_before, min(memory)) < 32, memory
