#!/usr/bin/env bash
# Builds evcxr_jupyter 0.22 into the benchmark's own cache (once) and runs the kernel benchmark
# against this checkout's release build. Prints a Markdown table.
set -euo pipefail
source "$(dirname "$0")/../install/env.sh"
"$PARALLAX_ROOT/install/build.sh"
"$PARALLAX_ROOT/install/venv.sh"
bench_cache="${PARALLAX_BENCH_CACHE:-$HOME/.cache/parallax/bench}"
evcxr="$bench_cache/bin/evcxr_jupyter"
if [ ! -x "$evcxr" ]; then
    # --locked uses evcxr_jupyter's own lock file, which avoids the salsa release that breaks a
    # fresh resolve of evcxr 0.22.
    cargo install evcxr_jupyter --version 0.22.0 --locked --root "$bench_cache"
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
"$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/kernel_latency.py" "$PARALLAX_BIN" "$evcxr" "$@"
