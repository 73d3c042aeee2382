"""Headless Debian Chromium driven by Playwright (the system executable; Playwright's own browser
download is never used), for the tests and benchmarks that need a real browser."""

import contextlib
import shutil
import tempfile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# As root Chromium needs --no-sandbox; the rest keep it from reaching for the network, which is
# closed here, and from needing a GPU or a large /dev/shm.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium_page(width=1400, height=1000):
    """A fresh page in a fresh headless Chromium with an empty profile."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="parallax-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
