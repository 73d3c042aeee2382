#!/usr/bin/env bash
# Engine pool benchmark: start-up, %px latency on 1/2/4 engines, engine memory. Prints a table.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh" >/dev/null
"$PARALLAX_ROOT/install/venv.sh"
data="$(mktemp -d)"
"$PARALLAX_BIN" install --prefix "$data" >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
JUPYTER_PATH="$data/share/jupyter" PARALLAX_LOG=warn "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/px_latency.py" "$@"
