#!/usr/bin/env bash
# The browser dashboard's cost and speed with 4 engines: the %pmap slowdown with the page open,
# the page's update latency, its data rate. Prints a table.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh" >/dev/null
"$PARALLAX_ROOT/install/venv.sh" --ui
"$PARALLAX_ROOT/install/browser.sh"
data="$(mktemp -d)"
"$PARALLAX_BIN" install --prefix "$data" >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
JUPYTER_PATH="$data/share/jupyter" PARALLAX_LOG=warn PYTHONPATH="$PARALLAX_ROOT/tests" \
    "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/dashboard_bench.py" "$@"
