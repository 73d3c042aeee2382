#!/usr/bin/env bash
# Parallax side by side with its peers, on this machine in one run: ipyparallel 9.2 (its %px
# through a real ipykernel, its views' maps and data movement) and evcxr_jupyter 0.22 (the same
# Rust cell in one process), then what a cell costs (bench/cells_bench.py). Prints tables with
# the ratios.
# Usage: bench/peers.sh [--runs N] [--engines 1,2,4,8]
set -euo pipefail
source "$(dirname "$0")/peers_env.sh"
PARALLAX_LOG=warn "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/peers_bench.py" "$@"
# What a cell costs: new and again, in the notebook and on 4 engines, and the cache's hits.
PARALLAX_LOG=warn "$PARALLAX_ROOT/.venv/bin/python" "$PARALLAX_ROOT/bench/cells_bench.py" "$@"
