"""A real browser: headless Debian Chromium, driven by Playwright, opens the kernel's dashboard
page while a %pmap runs, and runs a notebook on the Parallax kernel inside JupyterLab. Screenshots
are kept in tests/artifacts."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import chromium_page
from conftest import ARTIFACTS, RunningKernel, all_iopub_until_idle, of_type

URL = re.compile(r"http://127\.0\.0\.1:\d+/\?token=[0-9a-f]+")


@pytest.fixture(scope="module")
def cluster(kernelspec):
    running = RunningKernel(ARTIFACTS / "test_browser.kernel.log")
    reply, _ = running.execute("%cluster start -n 2", timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    reply, _ = running.execute(
        "%%px\nfn slow(x: u64) -> u64 { std::thread::sleep(std::time::Duration::from_millis(10)); x }",
        timeout=300,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    yield running
    running.stop()


def dashboard_url(cluster):
    reply, outputs = cluster.execute("%dashboard")
    assert reply["content"]["status"] == "ok", reply["content"]
    text = of_type(outputs, "display_data")[0]["content"]["data"]["text/plain"]
    cluster.execute("%dashboard --stop")
    found = URL.search(text)
    assert found, text
    return found.group(0)


def test_dashboard_page_shows_engines_and_a_growing_task_stream(cluster):
    url = dashboard_url(cluster)
    with chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#engines tbody tr[data-engine='1']", timeout=30_000)
        assert page.locator("#engines tbody tr td:first-child").all_text_contents() == ["0", "1"]
        assert page.text_content("#connection") == "live"
        stream = page.locator("#stream")
        seen_before = int(stream.get_attribute("data-tasks-seen"))

        # 1 200 items of 10 ms on 2 engines: about 6 s of chunks.
        msg_id = cluster.kc.execute("%pmap -o paged slow 0..1200u64")
        page.wait_for_selector("#running tr[data-job] >> text=map slow", timeout=120_000)
        samples = []
        while True:
            samples.append(int(stream.get_attribute("data-tasks-seen")))
            if page.locator("#running tr[data-job]").count() == 0 and len(samples) > 3:
                break
            time.sleep(0.3)
            assert len(samples) < 1000, "the map did not end"
        growing = [b for a, b in zip(samples, samples[1:]) if b > a]
        assert samples[-1] > seen_before and len(growing) >= 2, samples
        page.screenshot(path=str(ARTIFACTS / "dashboard_page.png"), full_page=True)
        all_iopub_until_idle(cluster.kc, msg_id)

        # Both lanes have bars; the history names the map; the page's figures match the API.
        assert int(stream.get_attribute("data-bars")) > 0
        page.wait_for_selector("#history tr[data-job] >> text=map slow", timeout=10_000)
        done_cells = page.locator("#engines tbody tr td:nth-child(7)").all_text_contents()
        assert all(int(d) > 0 for d in done_cells), done_cells
        latencies = page.evaluate("window.parallaxStats.latencies.length")
        assert latencies > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(path: Path, cells):
    path.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "execution_count": None,
                        "id": f"cell{i}",
                        "metadata": {},
                        "outputs": [],
                        "source": source,
                    }
                    for i, source in enumerate(cells)
                ],
                "metadata": {
                    "kernelspec": {"name": "parallax", "display_name": "Parallax (Rust)", "language": "rust"},
                    "language_info": {"name": "rust"},
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )


@pytest.fixture
def jupyterlab(kernelspec, tmp_path):
    port, token = free_port(), "parallax-test-token"
    root = tmp_path / "notebooks"
    root.mkdir()
    log = open(ARTIFACTS / "test_browser.jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            assert server.poll() is None, (ARTIFACTS / "test_browser.jupyterlab.log").read_text()
            assert time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.5)
    yield {"base": base, "token": token, "root": root}
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def kernels(lab, starting=False):
    """The server's kernels. `starting`: a kernel may be starting, and jupyter_server 2.21
    answers 500 while one is (its list_kernels reads the new kernel's last_activity before it is
    set; the traceback is in the lab's log): that answer means none is ready yet."""
    url = f"{lab['base']}/api/kernels?token={lab['token']}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        if starting and error.code == 500:
            return []
        raise


def test_the_kernel_in_jupyterlab_runs_px_and_dashboard(jupyterlab):
    notebook(
        jupyterlab["root"] / "parallel.ipynb",
        [
            "%cluster start -n 2",
            "%%px\nlet answer = 6 * 7 + std::env::var(\"PARALLAX_ENGINE_ID\").unwrap().parse::<i32>().unwrap();\nanswer",
            "%dashboard",
            "%px let more = answer + 1;",
        ],
    )
    with chromium_page() as page:
        page.goto(f"{jupyterlab['base']}/lab/tree/parallel.ipynb?token={jupyterlab['token']}")
        page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content[contenteditable='true'] >> visible=true", timeout=120_000)
        deadline = time.monotonic() + 120
        while not any(
            k["name"] == "parallax" and k["execution_state"] == "idle"
            for k in kernels(jupyterlab, starting=True)
        ):
            assert time.monotonic() < deadline, kernels(jupyterlab, starting=True)
            time.sleep(0.5)
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        outputs = page.locator(".jp-OutputArea-output")
        page.wait_for_selector(".jp-OutputArea-output >> text=Started 2 engines", timeout=600_000)
        page.wait_for_selector(".jp-OutputArea-output >> text=Out[0:", timeout=300_000)
        page.wait_for_selector(".jp-OutputArea-output >> text=Out[1:", timeout=60_000)
        page.wait_for_selector(".parallax-dashboard", timeout=60_000)
        text = "\n".join(outputs.all_inner_texts())
        assert re.search(r"Out\[0:\d+\]: 42", text) and re.search(r"Out\[1:\d+\]: 43", text), text
        dashboard = page.locator(".parallax-dashboard")
        assert "engines 2 alive" in dashboard.inner_text(), dashboard.inner_text()
        assert dashboard.locator("a >> text=open in a browser").count() == 1
        assert dashboard.locator("svg").count() == 1
        # The block is live in JupyterLab: the last cell's two tasks show up in it, redrawn in
        # place by update_display_data. Its first frame, drawn while %dashboard ran, counts 4
        # (each engine's warm-up and the %%px cell); only a redraw can count the last cell's
        # 2, which runs after it. (Waiting for the 4 raced with the last cell's end.)
        # Playwright is only in the --ui environment, which browser.py also imports it from.
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            page.wait_for_selector(".parallax-dashboard >> text=/ 6 done/", timeout=120_000)
        except PlaywrightTimeout:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_dashboard.png"), full_page=True)
            raise AssertionError(
                "the block never showed 6 done:\n" + "\n".join(outputs.all_inner_texts())
            )
        assert page.locator(".parallax-dashboard").count() == 1
        page.screenshot(path=str(ARTIFACTS / "jupyterlab_dashboard.png"), full_page=True)
