#!/usr/bin/env bash
# %pmap and data movement benchmark on 2 engines: map throughput, speed-up of a CPU-heavy map,
# MiB/s of %push, %scatter and %pull. Prints a table.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh" >/dev/null
"$PARALLAX_ROOT/install/venv.sh"
data="$(mktemp -d)"
"$PARALLAX_BIN" install --prefix "$data" >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
JUPYTER_PATH="$data/share/jupyter" PARALLAX_LOG=warn "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/pmap_bench.py" "$@"
