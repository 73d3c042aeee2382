#!/usr/bin/env bash
# Creates (or updates) the Python venv the examples and tests use: .venv at the repo root.
# Usage: install/venv.sh [--ui]   (--ui adds JupyterLab and Playwright for the browser tests)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
packages=(
    "jupyter_client==8.10.0"
    "jupyter-kernel-test==0.7.0"
    "nbclient==0.11.0"
    "nbformat"
    "jupyter-console==6.6.3"
    "pexpect==4.9.0"
    "pytest"
)
if [ "${1:-}" = "--ui" ]; then
    # The browser tests: JupyterLab to run notebooks in, Playwright to drive Debian's Chromium.
    packages+=("jupyterlab==4.6.6" "playwright==1.65.2")
fi
stamp="$venv/.parallax-packages"
wanted="${packages[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
    echo "$wanted" > "$stamp"
fi
